"""A stand-in for Slicer's launcher, for the worker tests: `PythonSlicer` is commontk/AppLauncher, a program that
prepends its own PYTHONPATH entries (the Extension Manager writes every installed extension's
qt-scripted-modules there) to the environment it was given, runs the real Python as its *child*, waits for it,
and exits with the child's exit code, or with 1 when the child was killed by a signal (QProcess::CrashExit).

write_launcher() writes an executable that the worker's client can be given as its `python`; running this file
is the launcher itself: `launcher_standin.py PYTHON FIRST_PATH[:...] -- ARGS...`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def decoy_library(folder: Path) -> Path:
    """A folder holding another ARSegLib (another extension's, a stray copy), whose worker says so and fails."""
    package = folder / "ARSegLib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "worker.py").write_text(f"import sys\nprint('decoy ARSegLib in {folder}')\nsys.exit(7)\n")
    return folder


def write_launcher(folder: Path, first_on_path: Sequence[Path], python: str = sys.executable) -> Path:
    """An executable `PythonSlicer` in folder that puts first_on_path before everything else on PYTHONPATH."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / "PythonSlicer"
    entries = os.pathsep.join(str(p) for p in first_on_path)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "{python}" "{entries}" -- "$@"\n')
    path.chmod(0o755)
    return path


def main(argv) -> int:
    python, entries = argv[0], argv[1]
    args = argv[argv.index("--") + 1:]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (entries, env.get("PYTHONPATH", "")) if p)
    code = subprocess.call([python, *args], env=env)
    return 1 if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
