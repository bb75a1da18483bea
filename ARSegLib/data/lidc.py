"""LIDC-IDRI 2D nodule crops: `LIDC-IDRI-XXXX/nodule-N/{images,mask-0..3}/slice-K.png`, read from one
or several tars, extracted directories, or a folder holding the tars (`../shared/data/lidc/`), with
`splits.json` beside them. Empty reader masks are kept: they are part of the ground-truth distribution."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

SPLITS = ("train", "val", "test", "all")
# patient and nodule folders are optional: a single nodule's folder (e.g. ct/lung1/lidc-slices) reads too
_MEMBER = re.compile(r"(?:^|/)(?:(LIDC-IDRI-\d+)/)?(?:(nodule-\d+)/)?(images|mask-[0-3])/slice-(\d+)\.png$")


@dataclass
class LIDCSlices:
    """N crops with all readers' masks. images_Nhw: uint8 0..255; masks_NRhw: uint8 0/1 (R = 4)."""

    images_Nhw: np.ndarray
    masks_NRhw: np.ndarray
    keys: List[Tuple[str, str, int]]  # (patient, nodule, slice index)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index) -> LIDCSlices:
        index = np.asarray(index, dtype=np.int64)
        return LIDCSlices(self.images_Nhw[index], self.masks_NRhw[index], [self.keys[i] for i in index])

    @property
    def patients(self) -> List[str]:
        return sorted({k[0] for k in self.keys})


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def _iter_members(path: Path):
    """(relative name, bytes) of every PNG in the tar or directory."""
    if path.is_dir():
        for p in sorted(path.rglob("*.png")):
            yield str(p.relative_to(path)), p.read_bytes()
    else:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".png"):
                    yield m.name, tar.extractfile(m).read()


def data_sources(paths: Union[str, Path, Sequence]) -> List[Path]:
    """The tars or PNG directories behind `paths`: each given tar or PNG directory as it is, and a folder
    that holds tars (but no crops of its own) as its tars, in name order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    sources: List[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"LIDC data not found: {path}")
        tars = sorted(path.glob("*.tar")) if path.is_dir() else []
        if tars and not any(path.glob("*/**/*.png")):
            sources += tars
        else:
            sources.append(path)
    if len(set(s.resolve() for s in sources)) != len(sources):
        raise ValueError(f"the same LIDC data is given twice: {', '.join(map(str, sources))}")
    return sources


def read_split_file(path) -> Optional[Dict[str, List[str]]]:
    """splits.json beside the data (the first of several sources that has one)."""
    for source in data_sources(path):
        split_file = (source if source.is_dir() else source.parent) / "splits.json"
        if split_file.exists():
            return json.loads(split_file.read_text())
    return None


def _cache_file(path: Path) -> Path:
    st = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("ARSEG_CACHE", Path.home() / ".cache" / "arseg"))
    return root / f"lidc-{tag}.npz"


def load_lidc(paths, split: str = "all", cache: bool = True) -> LIDCSlices:
    """Read every crop of `split` ('train', 'val', 'test' from splits.json beside the data, or 'all') from
    one source or several (tars, PNG directories, or a folder of tars); a crop may appear in only one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sources = data_sources(paths)
    splits = read_split_file(sources) if split != "all" else None
    if split != "all" and splits is None:
        raise FileNotFoundError(f"--split {split} needs splits.json beside {sources[0]}; use --split all")
    wanted = set(splits[split]) if splits else None
    parts = []
    for source in sources:
        data = _load_all(source, cache)
        if wanted is not None:
            data = data.subset([i for i, k in enumerate(data.keys) if k[0] in wanted])
        parts.append(data)
    return _concat(parts)


def _concat(parts: List[LIDCSlices]) -> LIDCSlices:
    if len(parts) == 1:
        return parts[0]
    keys = [k for p in parts for k in p.keys]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"crop {dup} is in more than one of the LIDC sources")
    return LIDCSlices(np.concatenate([p.images_Nhw for p in parts]),
                      np.concatenate([p.masks_NRhw for p in parts]), keys)


def _load_all(path: Path, cache: bool) -> LIDCSlices:
    cache_path = _cache_file(path) if cache else None
    if cache_path is not None and cache_path.exists():
        z = np.load(cache_path, allow_pickle=False)
        keys = [(p, n, int(s)) for p, n, s in z["keys"]]
        return LIDCSlices(z["images"], z["masks"], keys)
    images: Dict[Tuple[str, str, int], np.ndarray] = {}
    masks: Dict[Tuple[str, str, int], Dict[int, np.ndarray]] = {}
    for name, blob in _iter_members(path):
        m = _MEMBER.search(name)
        if not m:
            continue
        key = (m.group(1) or path.stem, m.group(2) or "nodule-0", int(m.group(4)))
        arr = _decode_png(blob)
        if m.group(3) == "images":
            images[key] = arr
        else:
            masks.setdefault(key, {})[int(m.group(3)[-1])] = (arr > 0).astype(np.uint8)
    keys = sorted(images, key=lambda k: (k[0], int(k[1].split("-")[1]), k[2]))
    if not keys:
        raise ValueError(f"no LIDC crops found in {path}")
    missing = [k for k in keys if len(masks.get(k, {})) != 4]
    if missing:
        raise ValueError(f"{len(missing)} crops lack one of the four reader masks, e.g. {missing[0]}")
    out = LIDCSlices(np.stack([images[k] for k in keys]),
                     np.stack([np.stack([masks[k][r] for r in range(4)]) for k in keys]), keys)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, images=out.images_Nhw, masks=out.masks_NRhw, keys=np.array(keys, dtype=str))
        os.replace(tmp, cache_path)
    return out
