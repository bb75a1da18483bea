"""torch.distributed under torchrun: gloo on CPU, NCCL on CUDA. A no-op in a single process."""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple:
    """Returns (rank, world_size). Starts a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def cuda_arch_supported(capability: Tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch build compiled for arch_list (torch.cuda.get_arch_list(): "sm_86", "sm_90a", "sm_100f",
    "compute_90") has kernels for a GPU of this compute capability (major, minor). Machine code for sm_XY runs on
    X.Z for Z >= Y; arch-specific sm_XYa only on X.Y; family sm_XYf on X.Z for Z >= Y; PTX (compute_XY) is
    compiled at load time for any capability >= X.Y. An arch list that names no CUDA architecture (empty, ROCm's
    gfx names) says nothing: supported."""
    major, minor = int(capability[0]), int(capability[1])
    parsed = [m for m in (_ARCH.fullmatch(a.strip()) for a in arch_list) if m]
    if not parsed:
        return True
    for kind, number, suffix in (m.groups() for m in parsed):
        a_major, a_minor = int(number[:-1]), int(number[-1])
        if kind == "compute":
            if (major, minor) >= (a_major, a_minor):
                return True
        elif suffix == "a":
            if (major, minor) == (a_major, a_minor):
                return True
        elif major == a_major and minor >= a_minor:
            return True
    return False


def resolve_device_noting(device: str = "auto") -> Tuple[str, Optional[str]]:
    """resolve_device, and why "auto" did not take the GPU where there is one (else None)."""
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu", None
        capability = torch.cuda.get_device_capability(0)
        arch_list = torch.cuda.get_arch_list()
        if getattr(torch.version, "hip", None) is None and not cuda_arch_supported(capability, arch_list):
            # it would fail at the first kernel ("no kernel image is available for execution on the device")
            return "cpu", (f"the GPU {torch.cuda.get_device_name(0)} (compute capability {capability[0]}."
                           f"{capability[1]}) is not supported by this torch build (built for "
                           f"{', '.join(arch_list)}): running on the CPU; install a torch build for this GPU "
                           f"to use it")
        return "cuda", None
    return resolve_device(device), None


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        resolved, note = resolve_device_noting(device)
        if note:
            print(f"ARSeg: {note}", file=sys.stderr, flush=True)
        return resolved
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if device in ("gpu",):
        return resolve_device("cuda")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and dist.is_initialized():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device
