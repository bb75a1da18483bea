"""The volumes a page may open: exactly the files and folders given on the command line, nothing else.

The browser never sends a path. It sees a list of (key, label) pairs and sends back a key; the server looks the
key up in this catalog, which was built once, at start-up, from the command line. A key that is not in the
catalog is refused. So no string typed into (or forged by) the browser reaches the file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

# what mrml.load_volume reads (ITK's readers through Slicer's volume storage node)
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# a folder of thousands of scans would make an unusable menu and a slow start: list this many, say so
MAX_ENTRIES = 500


class CatalogError(ValueError):
    """A command-line file or folder that cannot be served; the message says which and why."""


@dataclass(frozen=True)
class CatalogEntry:
    key: str  # what the browser sends back: an opaque index, never a path
    label: str  # what the browser shows: the file name, with the folder it was found under
    path: Path  # resolved on the server; never sent to the browser


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd")


def _holds_dicom(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


class VolumeCatalog:
    """An immutable, ordered allow-list of volume files."""

    def __init__(self, entries: Iterable[CatalogEntry], truncated: bool = False):
        self._entries: List[CatalogEntry] = list(entries)
        self._by_key: Dict[str, CatalogEntry] = {e.key: e for e in self._entries}
        self.truncated = truncated

    @classmethod
    def from_arguments(cls, files: Iterable = (), folders: Iterable = (), limit: int = MAX_ENTRIES) -> VolumeCatalog:
        """Files as given (each must exist and look like a volume), then each folder's volume files, recursively,
        in a stable order. The same file given twice is listed once."""
        found: List[tuple] = []  # (label, resolved path)
        for f in files:
            path = Path(f).expanduser()
            if path.is_dir() and _holds_dicom(path):  # a DICOM series folder, read by mrml.load_volume
                found.append((path.name, path.resolve()))
                continue
            if not path.is_file():
                raise CatalogError(f"volume file not found: {f}")
            if not is_volume_file(path):
                raise CatalogError(f"{f} is not a volume file this page reads ({', '.join(VOLUME_SUFFIXES)}; "
                                   f"segmentations .seg.nrrd are results, not inputs)")
            found.append((path.name, path.resolve()))
        for d in folders:
            folder = Path(d).expanduser()
            if not folder.is_dir():
                raise CatalogError(f"data folder not found: {d}")
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_volume_file(p)):
                found.append((f"{folder.name}/{path.relative_to(folder).as_posix()}", path.resolve()))
        seen, unique = set(), []
        for label, path in found:
            if path not in seen:
                seen.add(path)
                unique.append((label, path))
        truncated = len(unique) > limit
        entries = [CatalogEntry(key=f"v{i}", label=label, path=path) for i, (label, path) in enumerate(unique[:limit])]
        return cls(entries, truncated)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def get(self, key) -> Optional[CatalogEntry]:
        """The entry for a key from the browser, or None (anything else the browser sends is just not a key)."""
        return self._by_key.get(key) if isinstance(key, str) else None

    def choices(self) -> List[Dict[str, str]]:
        """What the volume chooser shows: labels and keys only, no paths."""
        return [{"title": e.label, "value": e.key} for e in self._entries]
