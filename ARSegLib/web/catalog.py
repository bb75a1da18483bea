"""The volumes a page may open: exactly the files and folders given on the command line, nothing else.

The browser never sends a path. It sees a list of (key, label) pairs and sends back a key; the server looks the
key up in this catalog, which was built once, at start-up, from the command line. A key that is not in the
catalog is refused. So no string typed into (or forged by) the browser reaches the file system.

A model whose card's task names several inputs (brats-glioma: flair, t1ce) is offered cases, not files: the volume
files of one folder grouped by the input each one's name says (a file whose name, in any case, is the input's name
or title, "FLAIR.nii.gz", or holds it as a word, "case7_t1ce.nii.gz": as mrml.volumes_for_inputs matches node
names), or a case given input by input ({name: path}). A case that lacks an input, or has two files for one, is
listed with what is wrong and refused when opened, before anything is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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
    path: Path  # resolved on the server; never sent to the browser (a case: its first input's file)
    # a case of several inputs: (input name, file) in the task's order, the inputs found; () for one volume
    inputs: Tuple[Tuple[str, Path], ...] = ()
    problem: str = ""  # why the case cannot be opened (an input missing, or two files for one); "" if it can

    @property
    def several_inputs(self) -> bool:
        return bool(self.inputs) or bool(self.problem)

    def input_paths(self) -> Dict[str, Path]:
        return dict(self.inputs)


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd")


def _volume_path(given, what: str = "") -> Path:
    """The resolved path of a volume file or DICOM series folder (read by mrml.load_volume), or a CatalogError
    starting with `what` (e.g. which input) that says why not."""
    path = Path(str(given)).expanduser()
    if path.is_dir() and _holds_dicom(path):
        return path.resolve()
    if not path.is_file():
        raise CatalogError(f"{what}volume file not found: {given}")
    if not is_volume_file(path):
        raise CatalogError(f"{what}{given} is not a volume file this page reads ({', '.join(VOLUME_SUFFIXES)}, or a "
                           f"DICOM series folder; segmentations .seg.nrrd are results, not inputs)")
    return path.resolve()


def _holds_dicom(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _name_words(name: str) -> List[str]:
    return [w for w in re.split(r"[^0-9a-z]+", str(name).lower()) if w]


def _bare_name(name: str) -> str:
    """A file's name without its volume extensions ("FLAIR.nii.gz" -> "flair"), lower case."""
    return re.sub(r"(\.(nii|gz|nrrd|nhdr|mha|mhd|dcm))+$", "", str(name or "").lower())


def _input_words(task) -> List[Tuple[str, set]]:
    """(input name, the words that name it: its name and title, lower case) per input of the task."""
    return [(i.name, {i.name.lower(), i.title.lower()}) for i in task.inputs]


def match_inputs(paths: Sequence[Path], task) -> Tuple[Dict[str, Path], Dict[str, List[Path]]]:
    """The files of one folder by the task input each is named for: exact names first ("flair.nii.gz"), else a word
    of the name ("case_flair.nii.gz"); a file goes to one input at most. Returns ({input: file}, {input: [files]}
    where several files fit one input equally well: ambiguous, not chosen)."""
    found: Dict[str, Path] = {}
    ambiguous: Dict[str, List[Path]] = {}
    taken: set = set()
    for name, words in _input_words(task):
        free = [p for p in paths if p not in taken]
        exact = [p for p in free if _bare_name(p.name) in words]
        by_word = [p for p in free if words & set(_name_words(_bare_name(p.name)))]
        fits = exact or by_word
        if len(fits) == 1:
            found[name] = fits[0]
            taken.add(fits[0])
        elif fits:
            ambiguous[name] = fits
    return found, ambiguous


def case_problem(task, found: Mapping[str, Path], ambiguous: Mapping[str, List[Path]], where: str) -> str:
    """What keeps a case from opening, in words ("" when every input has its one file)."""
    titles = {i.name: i.title for i in task.inputs}
    words = []
    for name, files in ambiguous.items():
        words.append(f"{len(files)} files could be its {titles[name]} ({', '.join(p.name for p in files)})")
    missing = [f"{titles[n]} ({n})" for n in task.input_names if n not in found and n not in ambiguous]
    if missing:
        words.append(f"no {' or '.join(missing)} volume")
    if not words:
        return ""
    return (f"{where} cannot be opened: {'; '.join(words)}. The model takes "
            f"{', '.join(titles[n] for n in task.input_names)}: a file per input, named after it (e.g. "
            f"{'.nii.gz, '.join(task.input_names)}.nii.gz)")


class VolumeCatalog:
    """An immutable, ordered allow-list of volume files."""

    def __init__(self, entries: Iterable[CatalogEntry], truncated: bool = False):
        self._entries: List[CatalogEntry] = list(entries)
        self._by_key: Dict[str, CatalogEntry] = {e.key: e for e in self._entries}
        self.truncated = truncated

    @classmethod
    def from_arguments(cls, files: Iterable = (), folders: Iterable = (), limit: int = MAX_ENTRIES, task=None,
                       cases: Iterable[Mapping[str, object]] = ()) -> VolumeCatalog:
        """Files as given (each must exist and look like a volume), then each folder's volume files, recursively,
        in a stable order. The same file given twice is listed once. task: the model card's; one that names several
        inputs makes the entries cases (from_cases), and cases ({input name or title: path}) are cases given input
        by input."""
        if task is not None and len(task.inputs) > 1:
            return cls.from_cases(task, files, folders, cases, limit)
        if list(cases):
            raise CatalogError("cases of several inputs are for a model whose card names several (this one takes "
                               "one volume): give the volume files themselves")
        found: List[tuple] = []  # (label, resolved path)
        for f in files:
            path = _volume_path(f)
            found.append((path.name, path))
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

    @classmethod
    def from_cases(cls, task, files: Iterable = (), folders: Iterable = (), cases: Iterable[Mapping[str, object]] = (),
                   limit: int = MAX_ENTRIES) -> VolumeCatalog:
        """Cases of a task's several inputs: each given case ({input name or title: volume file or DICOM series
        folder}, every input required),
        then the files given, grouped by the folder that holds them, and the folders given among them (a case's
        folder: the volume files directly in it), a case per folder, even one lacking an input (it is listed and
        refused when opened, saying which), then each data folder's sub-folders, recursively,
        that hold a file named for at least one input (a case each; other folders are not cases)."""
        titles = {i.title.lower(): i.name for i in task.inputs}
        rows: List[tuple] = []  # (label, {input: resolved path}, problem)
        for n, case in enumerate(cases, 1):
            paths: Dict[str, Path] = {}
            for key, value in dict(case).items():
                name = titles.get(str(key).strip().lower(), str(key).strip().lower())
                if name not in task.input_names:
                    raise CatalogError(f"input {key!r} is not one of the model's: {', '.join(task.input_names)}")
                if name in paths:
                    raise CatalogError(f"case {n}: input {name} is given twice")
                paths[name] = _volume_path(value, f"input {key}: ")
            missing = [i for i in task.input_names if i not in paths]
            if missing:
                raise CatalogError(f"case {n}: no {', '.join(missing)} given (the model takes "
                                   f"{', '.join(task.input_names)}: --input NAME=PATH for each)")
            first = paths[task.input_names[0]]
            rows.append((first.parent.name or first.name, paths, ""))
        by_folder: Dict[Path, List[Path]] = {}
        for f in files:
            path = Path(f).expanduser()
            if path.is_dir():  # a case's folder: the volume files directly in it
                inside = [p.resolve() for p in path.iterdir() if p.is_file() and is_volume_file(p)]
                by_folder.setdefault(path.resolve(), []).extend(inside)
                continue
            if not path.is_file():
                raise CatalogError(f"volume file not found: {f}")
            if not is_volume_file(path):
                raise CatalogError(f"{f} is not a volume file this page reads ({', '.join(VOLUME_SUFFIXES)}; "
                                   f"segmentations .seg.nrrd are results, not inputs)")
            by_folder.setdefault(path.resolve().parent, []).append(path.resolve())
        for folder, paths in by_folder.items():
            rows.append(cls._case_row(task, folder.name or str(folder), sorted(set(paths)), require_match=False))
        for d in folders:
            top = Path(d).expanduser()
            if not top.is_dir():
                raise CatalogError(f"data folder not found: {d}")
            volumes: Dict[Path, List[Path]] = {}
            for path in sorted(p for p in top.rglob("*") if p.is_file() and is_volume_file(p)):
                volumes.setdefault(path.parent, []).append(path.resolve())
            for folder, paths in sorted(volumes.items()):
                rel = folder.relative_to(top).as_posix()
                label = top.name if rel == "." else f"{top.name}/{rel}"
                row = cls._case_row(task, label, paths, require_match=True)
                if row is not None:
                    rows.append(row)
        seen, unique = set(), []
        for label, paths, problem in rows:
            ident = tuple(sorted(str(p) for p in paths.values())) or (label,)
            if ident not in seen:
                seen.add(ident)
                unique.append((label, paths, problem))
        entries = []
        for i, (label, paths, problem) in enumerate(unique[:limit]):
            inputs = tuple((name, paths[name]) for name in task.input_names if name in paths)
            first = inputs[0][1] if inputs else Path(label)
            shown = f"{label} ({' + '.join(i.title for i in task.inputs)})" if not problem else \
                f"{label} (incomplete)"
            entries.append(CatalogEntry(key=f"v{i}", label=shown, path=first, inputs=inputs, problem=problem))
        return cls(entries, len(unique) > limit)

    @staticmethod
    def _case_row(task, label: str, paths: List[Path], require_match: bool):
        found, ambiguous = match_inputs(paths, task)
        if require_match and not found and not ambiguous:
            return None  # a folder of other volumes: not a case
        return (label, found, case_problem(task, found, ambiguous, f"case {label}"))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def get(self, key) -> Optional[CatalogEntry]:
        """The entry for a key from the browser, or None (anything else the browser sends is just not a key)."""
        return self._by_key.get(key) if isinstance(key, str) else None

    def choices(self) -> List[Dict[str, str]]:
        """What the volume chooser shows: labels and keys only, no paths (a case: its folder and inputs)."""
        return [{"title": e.label, "value": e.key} for e in self._entries]
