"""Process-wide settings that make the codec fast on CPU; the CLI applies them at start-up.

The layers make large short-lived tensors. glibc hands each one fresh pages from mmap and
returns them on free, so every step pays page faults for the same memory again: telling
glibc to keep freed memory roughly halves training and decoding time on CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Ask glibc to serve large allocations from its heap and keep them; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


def check_device(name: str) -> str:
    """Refuse a device name the codec does not run on (xpu, meta, ...) before any model is built.

    Whether the device is actually present is checked when it is picked (`codec.pick_device`).
    """
    import re

    from .errors import CodecError

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise CodecError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return name
