"""Dynamic bits calibrated on images: mlx-lm's ``dynamic_quant`` sensitivity estimate (how much each layer's
quantization moves the logits, from gradients on calibration samples) run with EVE's images and conversations,
then more bits for the most sensitive layers up to a target of bits per weight.
``python -m mlx_eve.dynamic_quant --model M --data-path data/ --target-bpw 3``.
"""

from typing import Dict, List

from mlx_lm.quant import dynamic_quant as mlx_lm_dynamic

from .. import quantization
from ..models.base import EVEModel
from .calibration import CalibrationSample, set_aside


def estimate_sensitivities(
    model: EVEModel,
    samples: List[CalibrationSample],
    low_bits: int = 4,
    low_group_size: int = 64,
    high_bits: int = 5,
    high_group_size: int = 64,
    batch_size: int = 4,
) -> Dict[str, float]:
    """Each quantizable layer's sensitivity (module path → score; higher: more to lose at ``low_bits``)."""
    with set_aside(model) as calibrated:
        scores = mlx_lm_dynamic.estimate_sensitivities(
            calibrated, samples, low_bits, low_group_size, high_bits, high_group_size, batch_size=batch_size
        )
    return dict(scores)


def dynamic_quantize(
    model: EVEModel,
    sensitivities: Dict[str, float],
    target_bpw: float = 5.0,
    low_bits: int = 4,
    low_group_size: int = 64,
    high_bits: int = 5,
    high_group_size: int = 64,
) -> EVEModel:
    """Quantize ``model`` in place: ``high_bits`` for the layers above the sensitivity threshold that meets
    ``target_bpw`` (counted over the decoder, embedding and head), ``low_bits`` for the rest."""
    plan = quantization.plan(model, low_bits, low_group_size, keep_float=model.family.patch_embedding_paths)
    missing = sorted(set(plan) - set(sensitivities))
    if missing:
        raise quantization.QuantizationError(
            f"The sensitivities lack {len(missing)} of the model's layers ({', '.join(missing[:3])}, ...): "
            "they were estimated for another model."
        )
    with set_aside(model) as calibrated:
        threshold = mlx_lm_dynamic.estimate_threshold(
            calibrated, sensitivities, target_bpw, low_bits, low_group_size, high_bits, high_group_size
        )
    high = {"group_size": high_group_size, "bits": high_bits, "mode": "affine"}
    quantization.apply(model, {p: high if sensitivities[p] > threshold else q for p, q in plan.items()})
    return model
