"""What the hardware offers, where a setting is chosen from it (bf16 autocast of z*: ``autocast=auto``).

bf16 autocast pays only where matrix products run natively in bf16: on a CPU with ``avx512_bf16`` or AMX
(``amx_bf16``) a bf16 product is faster than an fp32 one; without them PyTorch emulates bf16 and the
products are about 3x slower than in fp32 (docs/results.md, sessions 10, 11 and 19). The environment
variable ``FACTEDIT_NATIVE_BF16`` (``1`` or ``0``) overrides the detection, e.g. to make runs on
different machines take the same path."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .errors import FactEditError

log = logging.getLogger(__name__)

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def bf16_units() -> tuple[str, ...]:
    """The CPU's native bf16 extensions among ``amx_bf16`` and ``avx512_bf16``; empty: bf16 is emulated.

    Read from /proc/cpuinfo; where there is none (not Linux), from PyTorch's own CPU probe."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
        return tuple(sorted(f for f in flags if f in BF16_FLAGS))
    except (OSError, StopIteration):
        pass
    probe = {"avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
             "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None)}
    return tuple(sorted(name for name, f in probe.items() if f is not None and f()))


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are native (faster than fp32) on ``device``.

    CPUs: ``bf16_units()`` is not empty. Other devices: False: bf16 z* has not been timed there, so
    ``auto`` keeps fp32 (set ``autocast=bf16`` explicitly on a GPU)."""
    env = os.environ.get("FACTEDIT_NATIVE_BF16")
    if env is not None and env != "":
        if env not in ("0", "1"):
            raise FactEditError(f"FACTEDIT_NATIVE_BF16 must be 0 or 1, not '{env}'")
        return env == "1"
    return torch.device(device).type == "cpu" and bool(bf16_units())


def resolve_autocast(setting: str, device: torch.device | str) -> str:
    """``auto`` becomes ``bf16`` where the device has native bf16 products and ``none`` elsewhere;
    ``none`` and ``bf16`` stay as they are."""
    if setting not in ("auto", "none", "bf16"):
        raise FactEditError(f"unknown autocast '{setting}' (auto, none or bf16)")
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "none"
