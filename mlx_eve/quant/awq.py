"""AWQ calibrated on images: mlx-lm's activation-aware scale and clip searches (``mlx_lm.quant.awq``) run layer by
layer on an EVE decoder, each linear on the inputs it sees in use, so EVEv2's visual copies are scaled and clipped
on image tokens. ``python -m mlx_eve.awq --model M --data-path data/ --bits 3``.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.quant.awq import apply_scale, clip_block, mse, search_best_scale
from tqdm import tqdm

from .. import quantization
from ..models.base import EVEModel
from ..models.eve_qwen2 import DecoderLayer, Modality
from .calibration import CalibrationSample, set_aside


@dataclass
class Scaling:
    """Layers that share an input and are scaled together, the inverse scale folded into ``prev``, which makes
    that input. ``block`` is what is compared quantized against float (default: the layers' outputs)."""

    prev: str
    layers: List[str]
    block: Optional[str] = None


# mlx-lm's LLaMA/Qwen2 recipe (``llama_awq``), for the text layers and EVEv2's visual copies. EVE's attention
# takes projected q/k/v (one joint pass over both branches), so q/k/v are compared by their outputs.
SCALINGS = [
    Scaling(f"{p}input_layernorm", [f"self_attn.{p}q_proj", f"self_attn.{p}k_proj", f"self_attn.{p}v_proj"])
    for p in ("", "moe_")
] + [
    scaling
    for mlp, norm in (("mlp", "post_attention_layernorm"), ("moe_mlp", "moe_post_attention_layernorm"))
    for scaling in (
        Scaling(f"{mlp}.up_proj", [f"{mlp}.down_proj"]),
        Scaling(norm, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], block=mlp),
    )
]
NO_CLIP = ["q_proj", "k_proj"]  # matched inside names, so the visual moe_q_proj/moe_k_proj too


class SideBySide(nn.Module):
    """Linears on one input, their outputs concatenated."""

    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        return mx.concatenate([layer(x) for layer in self.layers], axis=-1)


def awq_quantize(
    model: EVEModel,
    samples: List[CalibrationSample],
    bits: int = 4,
    group_size: int = 64,
    embed_bits: int = 4,
    embed_group_size: int = 32,
    n_grid: int = 20,
) -> EVEModel:
    """Quantize ``model`` in place: each decoder layer at ``bits`` after AWQ's scale and clip searches (kept only
    where they lower the layer's error, as mlx-lm does), the embedding and LM head at ``embed_bits``; the patch
    embedding stays in floating point."""

    def quantize_func(w: mx.array) -> mx.array:
        return mx.dequantize(*mx.quantize(w, group_size, bits), group_size=group_size, bits=bits)

    plan = quantization.plan(model, bits, group_size, keep_float=model.family.patch_embedding_paths)
    ends = {p: {"group_size": embed_group_size, "bits": embed_bits, "mode": "affine"} for p in _ends(model, plan)}
    quantization.apply(model, {p: ends[p] for p in ends if p == "model.embed_tokens"})
    with set_aside(model) as calibrated:
        hidden = [calibrated.embed(s)[None] for s in samples]
    arguments = [_layer_arguments(model, s) for s in samples]
    for i, layer in enumerate(tqdm(model.layers, desc="AWQ")):
        prefix = f"model.layers.{i}."
        layer_plan = {p[len(prefix) :]: q for p, q in plan.items() if p.startswith(prefix)}
        float_modules, float_weights = layer.leaf_modules(), layer.parameters()
        outputs = _record_inputs(layer, hidden, arguments)
        before = _quantized_error(layer, layer_plan, hidden, arguments, outputs)
        layer.update_modules(float_modules)
        for scaling in SCALINGS:
            _scale(layer, scaling, quantize_func, n_grid)
        clip_block(layer, NO_CLIP, quantize_func, group_size, n_grid)
        after = _quantized_error(layer, layer_plan, hidden, arguments, outputs)
        if after > before:
            tqdm.write(f"Layer {i}: AWQ did not lower the error ({after:.3g} > {before:.3g}), rounded as it was.")
            layer.update_modules(float_modules)
            layer.update(float_weights)
            _quantized_error(layer, layer_plan, hidden, arguments, outputs)
        for _, module in layer.named_modules():
            module.pop("input_feat", None)
        hidden = outputs
        mx.eval(layer.parameters())
        mx.clear_cache()
    quantization.apply(model, {p: ends[p] for p in ends if p != "model.embed_tokens"})
    return model


def _ends(model: EVEModel, plan: quantization.Plan) -> List[str]:
    """The embedding and LM head, quantized at their own width (when they divide into its groups)."""
    return [p for p in ("model.embed_tokens", "lm_head") if p in plan]


def _layer_arguments(model: EVEModel, sample: CalibrationSample) -> Dict[str, object]:
    arguments = {"mask": "causal" if sample.input_ids.size > 1 else None}
    if isinstance(model.layers[0], DecoderLayer):
        arguments["modality"] = Modality.of(sample.input_ids[None])
    return arguments


def _run(layer: nn.Module, hidden: List[mx.array], arguments: List[dict]) -> List[mx.array]:
    outputs = []
    for h, kwargs in zip(hidden, arguments):
        outputs.append(layer(h, **kwargs))
        mx.eval(outputs[-1])
    return outputs


def _record_inputs(layer: nn.Module, hidden: List[mx.array], arguments: List[dict]) -> List[mx.array]:
    """The layer's float outputs; each of its linears gets ``input_feat`` ``(1, tokens, width)``, the inputs it
    saw over all samples (mlx-lm's searches read it)."""
    seen: Dict[str, List[mx.array]] = {}

    def recorder(path: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.Linear):
            return module

        class Recorder(nn.Module):
            def __call__(self, x: mx.array) -> mx.array:
                seen.setdefault(path, []).append(x.reshape(1, -1, x.shape[-1]))
                return module(x)

        return Recorder()

    leaves = layer.leaf_modules()
    layer.update_modules(tree_map_with_path(recorder, leaves, is_leaf=nn.Module.is_module))
    try:
        outputs = _run(layer, hidden, arguments)
    finally:
        layer.update_modules(leaves)
    modules = dict(layer.named_modules())
    for path, inputs in seen.items():
        modules[path].input_feat = mx.concatenate(inputs, axis=1)
    mx.eval([m.input_feat for m in modules.values() if "input_feat" in m])
    return outputs


def _quantized_error(
    layer: nn.Module, layer_plan: quantization.Plan, hidden: List[mx.array], arguments: List[dict], outputs
) -> float:
    """Quantize the layer (in place) and return its mean squared error against the float ``outputs``."""
    nn.quantize(layer, class_predicate=lambda path, _: layer_plan.get(path, False))
    quantized = _run(layer, hidden, arguments)
    total = sum(mse(o, q).sum().item() for o, q in zip(outputs, quantized))
    return total / sum(o.size for o in outputs)


def _scale(layer: nn.Module, scaling: Scaling, quantize_func, n_grid: int) -> None:
    modules = dict(layer.named_modules())
    if scaling.prev not in modules or any(name not in modules for name in scaling.layers):
        return  # a branch this checkpoint does not have
    layers = [modules[name] for name in scaling.layers]
    block = modules[scaling.block] if scaling.block else SideBySide(layers)
    scales = search_best_scale(layers, quantize_func, block, {}, n_grid)
    apply_scale(modules[scaling.prev], layers, scales)
