"""Running on a CPU: which dtype to compute in, and the BLAS library Linux wheels need to be fast."""

import sys
from pathlib import Path
from typing import Optional, TextIO

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
_hinted = False


def compute_dtype(model: nn.Module) -> Optional[mx.Dtype]:
    """float32 for a 16-bit model on the CPU: MLX's CPU backend emulates half precision, about 10x slower
    than float32 here, and 4-bit matmuls with 16-bit scales about 30x slower than with float32 ones."""
    if mx.default_device() != mx.cpu:
        return None
    half = {mx.float16, mx.bfloat16}
    return mx.float32 if any(v.dtype in half for _, v in tree_flatten(model.parameters())) else None


def hint_openblas(maps: Path = Path("/proc/self/maps"), stream: Optional[TextIO] = None) -> None:
    """Once per process, on a Linux CPU, for a person at a terminal: MLX's Linux wheel links a slow reference
    BLAS; say how to preload OpenBLAS (float32 matmuls about 60x faster) unless it is loaded already."""
    global _hinted
    stream = stream or sys.stderr
    if _hinted or not stream.isatty() or not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return
    _hinted = True
    try:
        libraries = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    except OSError:
        return
    # numpy brings an OpenBLAS of its own (libscipy_openblas64_*), which MLX does not use.
    if any("openblas" in path.lower() and "scipy_openblas" not in path for path in libraries):
        return
    print(
        "[INFO] MLX computes on this CPU with a slow reference BLAS. For much faster float32, install OpenBLAS "
        f"(Debian/Ubuntu: apt install libopenblas0-pthread) and run with LD_PRELOAD={OPENBLAS}",
        file=stream,
    )
