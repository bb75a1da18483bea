"""What `cmake --install` puts in an extension's lib/Slicer-X.Y/qt-scripted-modules, from ARSeg/CMakeLists.txt
alone (CMake and Slicer's SDK cannot run here): its `set()` lists are read, and the files of its two calls are
copied as the macros copy them.

- slicerMacroBuildScriptedModule (Slicer's CMake/SlicerMacroBuildScriptedModule.cmake) calls
  ctkMacroCompilePythonScript with the module's SCRIPTS and RESOURCES, SOURCE_DIR its own folder (ARSeg/), and
  NO_INSTALL_SUBDIR unless WITH_SUBDIR is given;
- ctkMacroCompilePythonScript (CTK's CMake/ctkMacroCompilePythonScript.cmake) copies each script
  SOURCE_DIR/FILE to DESTINATION_DIR/FILE, adding ".py" where FILE's extension does not match "py", and each
  resource SOURCE_DIR/FILE to DESTINATION_DIR/FILE, then installs DESTINATION_DIR's contents into INSTALL_DIR
  (with NO_INSTALL_SUBDIR), or the folder itself.

Only what is listed is copied: a file the CMakeLists forgets is missing here as it would be in the extension, and
a listed file that does not exist fails as the build would."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
MODULE_CMAKE = ROOT / "ARSeg" / "CMakeLists.txt"


def _strip_comments(text: str) -> str:
    out, quoted, i = [], False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted:
            out.append(text[i:i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _commands(text: str) -> List[Tuple[str, List[Tuple[str, bool]]]]:
    """(name in lower case, [(argument, quoted)]) for every command, in order."""
    text = _strip_comments(text)
    commands = []
    for match in re.finditer(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(", text):
        i, depth, quoted, start = match.end(), 1, False, match.end()
        while depth:
            c = text[i]
            if c == '"':
                quoted = not quoted
            elif not quoted and c == "(":
                depth += 1
            elif not quoted and c == ")":
                depth -= 1
            i += 1
        body = text[start:i - 1]
        args = [(q, True) if q or u == "" else (u, False)
                for q, u in re.findall(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)', body)]
        commands.append((match.group(1).lower(), args))
    return commands


def _expand(value: str, variables: Dict[str, List[str]]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: ";".join(variables.get(m.group(1), [m.group(0)])), value)


def _arguments(args, variables) -> List[str]:
    """CMake's argument rules: an unquoted argument's expanded list splits into several, a quoted one stays one."""
    out = []
    for value, quoted in args:
        value = _expand(value, variables)
        out.extend([value] if quoted else [v for v in value.split(";") if v])
    return out


def _keywords(args: List[str], keywords) -> Dict[str, List[str]]:
    parsed: Dict[str, List[str]] = {}
    current = None
    for arg in args:
        if arg in keywords:
            current = arg
            parsed.setdefault(arg, [])
        elif current is not None:
            parsed[current].extend(v for v in arg.split(";") if v)
    return parsed


def install_plan(cmake: Path = MODULE_CMAKE) -> List[Tuple[Path, str]]:
    """(source file, path inside qt-scripted-modules) for every file the two calls install."""
    variables: Dict[str, List[str]] = {"PROJECT_SOURCE_DIR": [str(ROOT)],
                                       "CMAKE_CURRENT_SOURCE_DIR": [str(cmake.parent)]}
    plan = []
    for name, raw in _commands(cmake.read_text()):
        args = _arguments(raw, variables)
        if name == "set" and args:
            variables[args[0]] = [v for a in args[1:] for v in a.split(";") if v]
        elif name == "slicermacrobuildscriptedmodule":
            kw = _keywords(args, {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"})
            subdir = cmake.parent.name + "/" if "WITH_SUBDIR" in kw else ""
            plan += _copies(cmake.parent, kw.get("SCRIPTS", []), kw.get("RESOURCES", []), subdir)
        elif name == "ctkmacrocompilepythonscript":
            kw = _keywords(args, {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR",
                                  "INSTALL_DIR", "NO_INSTALL_SUBDIR", "GLOBAL_TARGET"})
            source = Path(kw["SOURCE_DIR"][0]) if kw.get("SOURCE_DIR") else cmake.parent
            subdir = "" if "NO_INSTALL_SUBDIR" in kw else Path(kw["DESTINATION_DIR"][0]).name + "/"
            plan += _copies(source, kw.get("SCRIPTS", []), kw.get("RESOURCES", []), subdir)
    return plan


def _copies(source: Path, scripts: List[str], resources: List[str], subdir: str) -> List[Tuple[Path, str]]:
    out = []
    for file in scripts:
        if not re.search("py", Path(file).suffix):
            file += ".py"
        out.append((source / file, subdir + file))
    out += [(source / file, subdir + file) for file in resources]
    for src, _ in out:
        if Path(src).is_absolute() and not src.is_file():
            raise FileNotFoundError(f"{MODULE_CMAKE.relative_to(ROOT)} lists {src}, which does not exist")
    return out


def lay_out(destination: Path, cmake: Path = MODULE_CMAKE, omit=()) -> Path:
    """Copy what the extension installs into destination (its qt-scripted-modules), less the paths in omit (as
    if the CMakeLists forgot them); returns destination."""
    for src, rel in install_plan(cmake):
        if rel in omit:
            continue
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return destination
