"""Process-wide settings that make training faster, applied once when the ``azgpt`` command starts.

glibc's malloc hands every allocation above a dynamic threshold (at most 32 MB) to a fresh ``mmap`` and
returns it to the kernel on free, and trims the heap top whenever more than 128 KB is free there. A
training step allocates and frees tensors of tens to hundreds of MB many times, so each step page-faults
(and the kernel zero-fills) the same memory again: about 100,000 minor faults per micro-batch on the
reference config. Raising the mmap and trim thresholds with ``mallopt`` keeps that memory in the heap
for reuse. ``mallopt`` acts at run time, so unlike the ``MALLOC_*_`` environment variables it needs no
re-exec of the process; it is glibc's own knob, so no extra package (tcmalloc, jemalloc) is needed.
"""

from __future__ import annotations

import ctypes
import os
import platform

OPT_OUT_VARIABLE = "AZGPT_NO_TUNING"

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Blocks up to 1 GiB come from the heap; the heap is never trimmed (-1), so freed memory is reused.
MMAP_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20

# A user's own allocator choice wins: leave the process alone when one of these is set.
_USER_ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                             "GLIBC_TUNABLES")

_applied: dict[str, str] | None = None


def tune_malloc() -> dict[str, str]:
    """Keep large freed blocks in glibc's heap instead of returning them to the kernel.

    Returns what was done, e.g. ``{"malloc": "glibc mallopt: ..."}``, or why nothing was (opt-out with
    ``AZGPT_NO_TUNING=1``, a non-glibc C library, a preloaded allocator or the user's own malloc settings).
    Safe to call more than once: later calls return the first call's answer.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = {"malloc": _tune_malloc_once()}
    return _applied


def _tune_malloc_once() -> str:
    if os.environ.get(OPT_OUT_VARIABLE, "") not in ("", "0"):
        return f"untouched ({OPT_OUT_VARIABLE} is set)"
    user_set = [name for name in _USER_ALLOCATOR_VARIABLES if os.environ.get(name)]
    if user_set:
        return f"untouched ({', '.join(user_set)} set by the user)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "untouched (not glibc)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "untouched (mallopt not found)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, TOP_PAD_BYTES)))
    if not ok:
        return "untouched (mallopt refused the settings)"
    return f"glibc mallopt: mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, no heap trimming"

