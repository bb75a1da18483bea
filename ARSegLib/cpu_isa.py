"""Which instruction sets the libraries under a click really use, and the environment that caps them at AVX2.

Many reviewers' machines have no AVX-512 (Intel's client CPUs since 12th gen, AMD before Zen 4). A machine that has
it can run the same code the way those machines do: each library that picks its kernels at run time honours a
variable read when it loads, so the cap works for a new process only (`avx2_environment()`, passed to a child), and
`instruction_sets()` inside that process says what each library actually picked, from the library itself (its
verbose log or its own report), so a cap that did not take effect is seen (`avx512_in_use()`), not assumed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from typing import Callable, Dict, List

# names the libraries give to AVX-512 (and what needs it: AVX10, AMX) kernels and instruction sets
_AVX512 = re.compile(r"avx.?512|avx10|amx|x86_v4|skylakex|cooperlake|sapphirerapids|cascadelake", re.I)


def _numpy_simd():
    try:
        from numpy._core import _multiarray_umath as umath  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core import _multiarray_umath as umath
    return umath


def avx2_environment() -> Dict[str, str]:
    """Variables that cap torch's own kernels (ATen), oneDNN, MKL, numpy's SIMD dispatch and numpy's OpenBLAS at
    AVX2 (with FMA), as on a CPU without AVX-512."""
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
           "OPENBLAS_CORETYPE": "Haswell"}
    # numpy refuses to start when asked to disable a feature it does not dispatch: name only those it does
    avx512 = [f for f in _numpy_simd().__cpu_dispatch__ if _AVX512.search(f)]
    if avx512:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(avx512)
    return env


def _stdout_of(fn: Callable[[], None]) -> str:
    """What fn's C code writes to file descriptor 1 (oneDNN's and MKL's verbose logs go there, not to sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read()


def _onednn_isa() -> str:
    """oneDNN's verbose log of one fp32 linear layer through the path the engine uses: its ISA line and the kernel."""
    import torch

    def run():
        with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            x, w, b = torch.randn(64, 160), torch.randn(640, 160), torch.randn(640)
            torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 64), b, "none", [], "")

    if not torch.backends.mkldnn.is_available():
        return "unavailable"
    log = _stdout_of(run)
    isa = [line.split("isa:", 1)[1] for line in log.splitlines() if ",info,cpu,isa:" in line]
    kernel = [line.split(",")[6] for line in log.splitlines() if ",exec,cpu,inner_product," in line]
    if not kernel:
        return "unknown (no oneDNN verbose output)"
    return f"{isa[0] if isa else '?'}; linear kernel {kernel[-1]}"


def _mkl_isa() -> str:
    """MKL's verbose banner of one SGEMM: it names the instruction set MKL dispatched to."""
    import torch

    def run():
        with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
            a = torch.randn(128, 128)
            a @ a

    if not torch.backends.mkl.is_available():
        return "unavailable"
    banner = [line for line in _stdout_of(run).splitlines() if line.startswith("MKL_VERBOSE") and "SGEMM" not in line]
    if not banner:
        return "unknown (no MKL verbose banner)"
    m = re.search(r"architecture (.*?), Lnx", banner[0])
    return m.group(1) if m else banner[0]


def _openblas_core() -> str:
    """The kernel family numpy's bundled OpenBLAS chose (it has no verbose log; its own get_corename says)."""
    import ctypes
    import glob

    import numpy

    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


_report: Dict[str, str] = {}


def instruction_sets() -> Dict[str, str]:
    """What each library picked in this process: torch's ATen kernels, oneDNN (the engine's linear layers and
    decoder convolutions), MKL (torch's other matrix products), numpy's SIMD dispatch, numpy's OpenBLAS.
    Probed once per process: oneDNN and MKL print their instruction set only the first time their log is on."""
    import torch

    if not _report:
        umath = _numpy_simd()
        found = [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)]
        _report.update({"aten": torch.backends.cpu.get_cpu_capability(), "onednn": _onednn_isa(), "mkl": _mkl_isa(),
                        "numpy": " ".join(found) or "baseline", "openblas": _openblas_core()})
    return dict(_report)


def avx512_in_use(report: Dict[str, str]) -> List[str]:
    """The libraries of `instruction_sets()` that still run AVX-512 (or could not say): empty when the cap holds."""
    problems = [f"{lib}: {value}" for lib, value in report.items() if lib != "aten" and _AVX512.search(value)]
    if report.get("aten", "").upper() != "AVX2":
        problems.append(f"aten: capability {report.get('aten')!r}, not AVX2")
    problems += [f"{lib}: {report[lib]}" for lib in ("onednn", "mkl") if report.get(lib, "").startswith("unknown")]
    return sorted(set(problems))


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 at all (else the native figures are already the AVX2 ones)."""
    import torch

    probe = getattr(torch.cpu, "_is_avx512_supported", None)
    return bool(probe()) if probe is not None else False
