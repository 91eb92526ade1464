"""GPTQ calibrated on images: mlx-lm's ``gptq_quantize`` run on an EVE model's decoder with EVE's own samples.

Each linear layer's Hessian comes from the inputs it sees on the calibration samples, so EVEv2's visual copies
get theirs from image tokens only. ``python -m mlx_eve.gptq --model M --data-path data/ --bits 3``.
"""

import contextlib
from typing import Iterator, List

import mlx.core as mx
import numpy as np
from mlx_lm.quant import gptq as mlx_lm_gptq

from ..models.base import EVEModel
from .calibration import CalibrationSample, set_aside


def pack(w: mx.array, bits: int, scales: mx.array, biases: mx.array) -> mx.array:
    """``w`` on the grid of ``scales``/``biases`` as MLX stores it: each row's codes as one little-endian bit
    stream in uint32 words, for every width MLX quantizes to (mlx-lm's GPTQ packs 2, 4 and 8 bits only)."""
    groups = scales.shape[-1]
    codes = mx.round((mx.unflatten(w, -1, (groups, -1)) - biases[..., None]) / scales[..., None])
    codes = np.asarray(mx.clip(codes, 0, 2**bits - 1).astype(mx.uint8)).reshape(w.shape[0], -1)
    bit_stream = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    packed = np.packbits(bit_stream.reshape(w.shape[0], -1), axis=-1, bitorder="little")
    return mx.array(packed.view(np.uint32))


@contextlib.contextmanager
def _packing_for(bits: int) -> Iterator[None]:
    # mlx-lm's GPTQ asserts on widths its packer lacks (3, 5, 6 bits); the algorithm itself takes any.
    if bits in (2, 4, 8):
        yield
        return
    original, mlx_lm_gptq.quantize = mlx_lm_gptq.quantize, pack
    try:
        yield
    finally:
        mlx_lm_gptq.quantize = original


def gptq_quantize(
    model: EVEModel,
    samples: List[CalibrationSample],
    bits: int = 4,
    group_size: int = 64,
    fallback_bits: int = 6,
    fallback_group_size: int = 64,
    batch_size: int = 8,
) -> EVEModel:
    """Quantize ``model`` in place: every decoder linear and the LM head with GPTQ at ``bits``, the embedding
    at ``fallback_bits`` (mlx-lm's split); the patch embedding stays in floating point."""
    with set_aside(model) as calibrated, _packing_for(bits):
        mlx_lm_gptq.gptq_quantize(
            calibrated, samples, bits, group_size, fallback_bits, fallback_group_size, batch_size=batch_size
        )
    mx.eval(model.parameters())
    return model
