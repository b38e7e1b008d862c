"""One place where every command turns an expected error into one line: `error: ...` and a non-zero exit.

Expected are ValueError (a bad flag, file, line, field or tensor; formats.DataError is one) and OSError (a
path that is missing, unreadable or unwritable); their messages name the culprit. Anything else is a bug
and keeps its traceback, to be reported.
"""
import sys
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def one_line_errors():
    try:
        yield
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def default_dtype(device: str, cpuinfo="/proc/cpuinfo") -> str:
    """bf16 where the hardware computes it natively (CUDA; a CPU with AVX512-BF16 or AMX, read from /proc/cpuinfo),
    else fp32: on a CPU without them bf16 is emulated, ten times slower (an AMD Zen 3, 2026-11)."""
    if device.startswith("cuda"):
        return "bf16"
    if not device.startswith("cpu"):  # mps, or a bad name that check_device reports
        return "fp32"
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux: no way to ask without guessing
        return "fp32"
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def describe_dtype(dtype: str, device: str) -> str:
    """One line for the start of a run: which dtype, and why."""
    why = "--dtype" if dtype != default_dtype(device) else f"the default on {device}" + \
        (", whose CPU has bf16 instructions" if dtype == "bf16" and device == "cpu" else "")
    return f"dtype {dtype} ({why}): " + ("bf16 frozen weights, fp32 LoRA, bf16 autocast" if dtype == "bf16" else "fp32")
