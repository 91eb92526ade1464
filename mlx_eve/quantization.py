"""Quantization: which layers get how many bits, the ``quantization`` block of ``config.json``, and reading
a quantized checkpoint back. The conventions, the mixed-precision recipes and the per-layer reading are
mlx-lm's; what EVE adds is that its patch embedding always stays in floating point.
"""

from collections import Counter
from typing import Callable, Dict, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder
from mlx_lm.utils import infer_quant_config

from .errors import EVEError

# Module path → the parameters ``to_quantized`` takes: group_size, bits, mode.
Plan = Dict[str, dict]


class QuantizationError(EVEError, ValueError):
    pass


def plan(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 64,
    recipe: Optional[str] = None,
    keep_float: Sequence[str] = (),
) -> Plan:
    """Every layer to quantize: each linear and embedding whose input width is a whole number of groups
    (mlx-lm's rule), except the modules under ``keep_float`` (paths such as ``model.vision_tower``).

    ``recipe``: one of mlx-lm's mixed-precision recipes (``mixed_4_6`` etc.), applied to both EVEv2 branches,
    which name their projections alike (``v_proj``/``moe_v_proj``, ``down_proj`` in ``mlp``/``moe_mlp``).
    """
    choose = _recipe(recipe, model, group_size) if recipe else None
    chosen = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue
        if any(path == p or path.startswith(p + ".") for p in keep_float):
            continue
        chosen[path] = choose(path, module) if choose else {"group_size": group_size, "bits": bits, "mode": "affine"}
    return chosen


def _recipe(name: str, model: nn.Module, group_size: int) -> Callable[[str, nn.Module], dict]:
    if name not in QUANT_RECIPES:
        raise QuantizationError(f"Unknown quantization recipe {name!r}: use one of {', '.join(QUANT_RECIPES)}.")
    return mixed_quant_predicate_builder(name, model, group_size)


def apply(model: nn.Module, layers: Plan) -> None:
    """Swap the planned layers for their quantized versions (in place)."""
    nn.quantize(model, class_predicate=lambda path, _: layers.get(path, False))


def config_block(layers: Plan) -> Optional[dict]:
    """mlx-lm's ``quantization`` entry: the most common layer parameters, plus every layer that differs."""
    if not layers:
        return None
    counts = Counter(tuple(sorted(params.items())) for params in layers.values())
    default = dict(counts.most_common(1)[0][0])
    return {**default, **{path: params for path, params in layers.items() if params != default}}


def of_model(model: nn.Module) -> Plan:
    """The parameters of each layer the model holds quantized."""
    return {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
        for path, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "group_size")
    }


def of_checkpoint(model: nn.Module, config: dict, weights: Mapping[str, mx.array]) -> Plan:
    """The layers a checkpoint stores quantized, as mlx-lm's loader reads them: the per-layer entries of the
    config's ``quantization`` block, else what the stored shapes say (``weights`` may be lazy placeholders of
    the right shapes and dtypes). ``model`` must not be quantized yet."""
    overrides = config.get("quantization") or {}
    modules = dict(model.named_modules())
    layers = {}
    for key in weights:
        if not key.endswith(".scales"):
            continue
        path = key[: -len(".scales")]
        if isinstance(overrides.get(path), dict):
            layers[path] = {"mode": "affine", **overrides[path]}
        elif hasattr(modules.get(path), "to_quantized"):  # anything else is reported by the weight check
            layers[path] = infer_quant_config(path, modules[path], weights)
    return layers
