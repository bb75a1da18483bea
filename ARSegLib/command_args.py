"""What the `arseg` commands share with the baselines' commands and the tools: a point from its text, the
training configuration from the arguments, the data `arseg eval` reads, the machine a run happened on, and the
one error a command prints as a line. Here, not in cli.py, so that nothing imports the command itself."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path


class CommandError(Exception):
    """A user-facing failure of `arseg segment` / `arseg batch`: printed as one line, exit status 2."""


def parse_point(text) -> tuple:
    """'R,A,S' (or three separate values) in millimetres -> (R, A, S)."""
    tokens = [t for part in (text if isinstance(text, (list, tuple)) else [text]) for t in str(part).split(",") if t]
    try:
        values = tuple(float(t) for t in tokens)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        given = " ".join(map(str, text if isinstance(text, (list, tuple)) else [text]))
        raise CommandError(f"--point takes three finite numbers R,A,S in millimetres (e.g. --point "
                           f"-56.4,-86.3,-116.0), got {given!r}")
    return values


def config_from_args(args, config_class, tiny_factory):
    """A training configuration: --tiny (tests, smoke runs), --config FILE (JSON of its fields), else the defaults."""
    if args.tiny:
        return tiny_factory(crop_size=128)
    if args.config:
        return config_class.from_dict(json.loads(Path(args.config).read_text()))
    return config_class()


def train_config(args, **defaults):
    from .training.trainer import TrainConfig

    tc = TrainConfig(out_dir=args.out, device=args.device, threads=args.threads, **defaults)
    for name in ("steps", "minutes", "batch", "lr", "eval_every", "eval_images"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(tc, name, v)
    return tc


def eval_data(args):
    """(split, crops) for `arseg eval`: --split from splits.json beside the data (every crop without one), --limit."""
    from .data.lidc import load_lidc, read_split_file

    split = args.split
    if split != "all" and read_split_file(args.data) is None:
        print(f"arseg eval: no splits.json beside {' '.join(args.data)}: evaluating every crop (--split all)",
              file=sys.stderr)
        split = "all"
    data = load_lidc(args.data, split)
    if args.limit:
        data = data.subset(range(min(args.limit, len(data))))
    return split, data


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    import os

    return f"{cpu}, {os.cpu_count()} logical cores{gpu}, torch {torch.__version__}"
