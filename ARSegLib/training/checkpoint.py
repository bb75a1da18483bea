"""Full training checkpoints (optimizer and RNG state; git-ignored) with atomic writes, and a CSV log."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def save_checkpoint(path, state: Dict[str, Any]):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint


def load_checkpoint(path) -> Optional[Dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return None
    # our own files, but they hold optimizer state and RNG tensors: weights_only keeps loading safe
    return torch.load(path, map_location="cpu", weights_only=True)


class CSVLog:
    """Appends rows. A row with new columns (validation metrics appear only now and then) rewrites the
    file once with the wider header, so no value is dropped."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = None
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path) as f:
                self.fields = next(csv.reader(f), None)

    def write(self, row: Dict[str, Any]):
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        new = [k for k in row if k not in self.fields]
        if new:
            with open(self.path, newline="") as f:
                old = list(csv.DictReader(f))
            self.fields += new
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.fields)
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, self.path)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
