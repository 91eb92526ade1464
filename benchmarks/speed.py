"""Benchmark mlx-eve against mlx-lm on the same machine, in the same run, with the same weights and token counts.

For each chosen shape (EVEv1 at Vicuna-7B shape, EVEv2 at Qwen2.5-0.5B/1.5B/7B shape) an EVE model with random
weights is built, and beside it mlx-lm's plain LLaMA / Qwen2 whose parameters are the EVE model's text-branch
arrays themselves (shared, not copied). Both run through mlx-lm's ``generate_step``: an image prompt is prefilled
from the same input embeddings (mlx-lm treats every row as text), and decoding starts from KV caches holding the
same context. EVEv2's split layers are also timed against the reference's compute-both-branches-and-blend layer
on the same weights. The sides take turns in every repeat. Ratios compare each side's fastest repeat, since other
processes on a shared machine only ever add time; medians of the per-repeat ratios are reported beside them.

    python benchmarks/speed.py --help
"""

import argparse
import importlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlx_eve import quantization
from mlx_eve.families import Family, family_of
from mlx_eve.loading import build_model
from mlx_eve.models import IMAGE_TOKEN_ID
from mlx_eve.models.base import EVEModel

# Text tokens around the image in a one-question prompt: the template's system prompt and " USER: " before,
# "\n", a short question and " ASSISTANT:" after.
TEXT_TOKENS_BEFORE_IMAGE = 40
TEXT_TOKENS_AFTER_IMAGE = 12

TARGETS = {
    "decode": 0.97,  # EVE decode tokens/s ÷ mlx-lm's, at every context length (at least)
    "prefill": 0.90,  # EVE image-prompt prefill tokens/s ÷ mlx-lm's, at every image size (at least)
    "patch_share": 0.05,  # patch embedding ÷ EVE time to first token, default resolution (at most)
    "memory": 1.10,  # EVE peak memory ÷ (weights + KV cache), default resolution (at most)
    "blend_speedup": 1.7,  # reference-blend prefill time ÷ split-layer prefill time, default resolution (at least)
}

# Decoder layers kept on a CPU unless --layers says otherwise: each layer keeps its real shape.
CPU_LAYERS = 4

_QWEN2 = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)
_EVE_V2 = dict(model_type="eve-qwen2", mm_hidden_size=1024, add_moe=True, moe_part="layernorm-self_attn-mlp")
_EVE_V1 = dict(model_type="eve", mm_hidden_size=1024, mm_projector_type="mlp2x_gelu")


@dataclass(frozen=True)
class Shape:
    description: str
    config: dict
    # Sides of the square, preprocessed test images; the first is the model's default resolution.
    image_sizes: Tuple[int, ...]
    # The reference shrinks the vocabulary to the tokenizer's length; `load` sets `vocab_limit` to it.
    tokenizer_size: Optional[int] = None


SHAPES = {
    "v1-7b": Shape(
        "EVEv1 (BAAI/EVE-7B-HD-v1.0): Vicuna-7B-v1.5 decoder",
        dict(
            _EVE_V1,
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            vocab_size=32000,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        (1344, 672),
    ),
    "v2-0.5b": Shape(
        "EVEv2 layout on a Qwen2.5-0.5B decoder",
        dict(
            _EVE_V2,
            **_QWEN2,
            hidden_size=896,
            num_hidden_layers=24,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
        (1600, 1024, 512),
        151665,
    ),
    "v2-1.5b": Shape(
        "EVEv2 layout on a Qwen2.5-1.5B decoder",
        dict(
            _EVE_V2,
            **_QWEN2,
            hidden_size=1536,
            num_hidden_layers=28,
            intermediate_size=8960,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
        (1600, 1024, 512),
        151665,
    ),
    "v2-7b": Shape(
        "EVEv2 (BAAI/EVE-7B-HD-v2.0): Qwen2.5-7B decoder",
        dict(
            _EVE_V2,
            **_QWEN2,
            hidden_size=3584,
            num_hidden_layers=28,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
        (1600, 1024, 512),
        151665,
    ),
    "v1-tiny": Shape(
        "EVEv1 layout, tiny (smoke tests)",
        dict(
            _EVE_V1,
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            vocab_size=256,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            mm_hidden_size=64,
        ),
        (56, 28),
    ),
    "v2-tiny": Shape(
        "EVEv2 layout, tiny (smoke tests)",
        dict(
            _EVE_V2,
            **_QWEN2,
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            tie_word_embeddings=False,
            mm_hidden_size=64,
        ),
        (64, 32),
        250,
    ),
}

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def shape_config(name: str, layers: Optional[int] = None) -> dict:
    config = dict(SHAPES[name].config)
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def build_models(
    config: dict,
    dtype: mx.Dtype = mx.float32,
    bits: int = 0,
    group_size: int = 64,
    vocab_limit: Optional[int] = None,
) -> Tuple[EVEModel, nn.Module]:
    """A random-weight EVE model and mlx-lm's plain LLaMA / Qwen2 holding the EVE text-branch arrays."""
    eve = build_model(config, vision_args={})
    family = eve.family
    eve.set_dtype(dtype)
    if bits:
        quantization.apply(eve, quantization.plan(eve, bits, group_size, keep_float=family.patch_embedding_paths))
    # One array at a time, so the float32 initial values of a large model never exist all at once.
    for _, array in tree_flatten(eve.parameters()):
        mx.eval(array)
    eve.eval()
    eve.vocab_limit = vocab_limit

    lm_module = importlib.import_module(f"mlx_lm.models.{family.text_model}")
    lm = lm_module.Model(lm_module.ModelArgs.from_dict({**config, "model_type": family.text_model}))
    if bits:
        quantization.apply(lm, quantization.plan(lm, bits, group_size))
    lm.load_weights(text_weights(eve), strict=True)
    lm.eval()
    return eve, lm


def _is_text_decoder_key(family: Family, key: str) -> bool:
    return ".moe_" not in key and not family.is_patch_embedding(key)


def text_weights(eve: EVEModel) -> List[Tuple[str, mx.array]]:
    """The EVE parameters a plain LLaMA / Qwen2 has: the decoder without the visual copies and image modules."""
    return [(k, v) for k, v in tree_flatten(eve.parameters()) if _is_text_decoder_key(eve.family, k)]


def parameter_bytes(model: nn.Module, prefix: str = "") -> int:
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k.startswith(prefix))


def decode_weight_bytes(model: nn.Module) -> int:
    """Weights a decode step reads: text layers, final norm and head (the one embedding row it reads is
    negligible, unless the embedding is the head)."""
    tied, family = model.args.tie_word_embeddings, model.family
    return sum(
        v.nbytes
        for k, v in tree_flatten(model.parameters())
        if _is_text_decoder_key(family, k) and (tied or not k.startswith("model.embed_tokens."))
    )


class ReferenceBlend(nn.Module):
    """EVEv2 computed the reference's way (``moe_function`` in EVEv2/eve/model/language_model/qwen2/
    modeling_qwen2.py): in every multi-token chunk both copies of each norm, projection and MLP run on all tokens
    and are blended with the visual-token mask. Same weights and attention as ``eve``; used for timing only."""

    def __init__(self, eve: EVEModel):
        super().__init__()
        self.eve = eve

    @property
    def layers(self):
        return self.eve.layers

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        eve, decoder = self.eve, self.eve.model
        h = decoder.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        visual = (inputs == IMAGE_TOKEN_ID)[..., None].astype(h.dtype) if inputs.shape[-1] > 1 else None
        cache = cache or [None] * len(decoder.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(decoder.layers, cache):
            h = _blend_layer(layer, h, visual, mask, c)
        out = decoder.norm(h)
        logits = decoder.embed_tokens.as_linear(out) if eve.args.tie_word_embeddings else eve.lm_head(out)
        return logits[..., : eve.vocab_limit] if eve.vocab_limit else logits


def _blend_layer(layer: nn.Module, h: mx.array, visual: Optional[mx.array], mask, cache) -> mx.array:
    attn = layer.self_attn

    def both(owner: nn.Module, name: str, x: mx.array) -> mx.array:
        text = owner[name](x)
        if visual is None:
            return text
        return text * (1.0 - visual) + owner["moe_" + name](x) * visual

    x = both(layer, "input_layernorm", h)
    queries, keys, values = (both(attn, name, x) for name in ("q_proj", "k_proj", "v_proj"))
    h = h + both(attn, "o_proj", attn(queries, keys, values, mask, cache))
    return h + both(layer, "mlp", both(layer, "post_attention_layernorm", h))


def token_stride(config: dict) -> int:
    """Pixels per image token along a side, at the family's default strides."""
    return family_of(config["model_type"]).image_processor().token_stride


def image_tokens(side: int, stride: int) -> int:
    """Embeddings of a square ``side``² image: a class token, then each row of the grid and a separator."""
    n = side // stride
    return 1 + n * (n + 1)


def image_prompt(n_image_tokens: int, vocab: int, rng: np.random.Generator) -> mx.array:
    """Random text ids around a run of image placeholders, laid out as the processor lays out a prompt."""
    before, after = TEXT_TOKENS_BEFORE_IMAGE, TEXT_TOKENS_AFTER_IMAGE
    ids = rng.integers(0, vocab, before + n_image_tokens + after)
    ids[before : before + n_image_tokens] = IMAGE_TOKEN_ID
    return mx.array(ids, dtype=mx.int32)


@dataclass
class Run:
    seconds: float
    embed_seconds: float = 0.0
    peak_bytes: int = 0  # memory in use at the peak beyond what was in use before the run
    kv_bytes: int = 0


def _synchronize() -> None:
    mx.synchronize()
    mx.synchronize(generation_stream)


def prefill_once(model: nn.Module, ids: mx.array, embed: Callable[[], mx.array], step: int) -> Run:
    """Embed the prompt (``embed``), then prefill it through ``generate_step`` until the first token exists."""
    cache = make_prompt_cache(model)
    _synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    tic = time.perf_counter()
    embeddings = embed()
    mx.eval(embeddings)
    embedded = time.perf_counter()
    # max_tokens=0 computes the first token and stops, leaving nothing in flight.
    for _ in generate_step(
        ids, model, max_tokens=0, input_embeddings=embeddings, prompt_cache=cache, prefill_step_size=step
    ):
        pass
    toc = time.perf_counter()
    _synchronize()
    peak = max(mx.get_peak_memory() - before, 0)
    return Run(toc - embedded, embedded - tic, peak, sum(c.nbytes for c in cache))


def filled_caches(models: Sequence[nn.Module], context: int, head_dim: int, dtype: mx.Dtype) -> List[List]:
    """A KV cache per model holding the same ``context`` random keys and values, as after a prefill."""
    shapes = [(1, layer.self_attn.n_kv_heads, context, head_dim) for layer in models[0].layers]
    keys = [mx.random.normal(s, dtype=dtype) for s in shapes]
    values = [mx.random.normal(s, dtype=dtype) for s in shapes]
    caches = []
    for model in models:
        cache = make_prompt_cache(model)
        for c, k, v in zip(cache, keys, values):
            c.update_and_fetch(k, v)
        mx.eval([c.state for c in cache])
        caches.append(cache)
    return caches


def decode_once(model: nn.Module, cache: List, tokens: int) -> Run:
    """Time ``tokens`` decode steps after the first from a filled cache, then trim the cache back.

    The run's time is ``tokens`` times its median step, so one step slowed by another process does not count.
    """
    context = cache[0].offset
    steps = generate_step(mx.array([1], dtype=mx.int32), model, max_tokens=tokens + 1, prompt_cache=cache)
    next(steps)
    tic = time.perf_counter()
    intervals = []
    for _ in steps:
        toc = time.perf_counter()
        intervals.append(toc - tic)
        tic = toc
    _synchronize()
    trim_prompt_cache(cache, cache[0].offset - context)
    return Run(tokens * statistics.median(intervals))


def take_turns(runs: Dict[str, Callable[[], Run]], warmup: int, repeats: int) -> Dict[str, List[Run]]:
    """Run every callable ``warmup + repeats`` times, in turn and in a rotating order; drop the warm-ups."""
    names = list(runs)
    results = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            result = runs[name]()
            if i >= warmup:
                results[name].append(result)
    return results


def fastest(runs: Sequence[Run], attribute: str = "seconds") -> float:
    """The fastest repeat: other processes on the machine can only ever add time."""
    return min(getattr(r, attribute) for r in runs)


def median_ratio(numerators: Sequence[Run], denominators: Sequence[Run]) -> float:
    """Median over repeats of the ratio of the two sides' times within the same repeat."""
    return statistics.median(a.seconds / b.seconds for a, b in zip(numerators, denominators))


@dataclass
class PrefillResult:
    """Times are of the fastest repeat; ``median_*`` are medians of the per-repeat ratios, for comparison."""

    image_size: int
    image_tokens: int
    prompt_tokens: int
    patch_s: float  # EVE: pixels → prompt embeddings (the patch embedding, placed among the text embeddings)
    eve_s: float  # prefill up to the first token, from the embeddings
    lm_s: float
    median_ratio: float
    eve_peak_bytes: int
    lm_peak_bytes: int
    kv_bytes: int
    blend_s: Optional[float] = None
    median_blend_speedup: Optional[float] = None

    @property
    def ratio(self) -> float:
        """EVE prefill tokens/s ÷ mlx-lm's."""
        return self.lm_s / self.eve_s

    @property
    def blend_speedup(self) -> Optional[float]:
        """Reference-blend prefill time ÷ split-layer prefill time."""
        return None if self.blend_s is None else self.blend_s / self.eve_s


@dataclass
class DecodeResult:
    """Speeds are of the fastest repeat; ``median_ratio`` is the median of the per-repeat ratios."""

    context: int
    eve_tps: float
    lm_tps: float
    median_ratio: float
    bytes_per_token: int  # weights read per token plus the KV cache at this context
    bandwidth: Optional[float] = None  # best bytes/s of matrix-vector reads between the decode runs

    @property
    def ratio(self) -> float:
        return self.eve_tps / self.lm_tps


@dataclass
class Result:
    shape: str
    dtype: str
    bits: int
    layers: int
    full_layers: int
    eve_weight_bytes: int
    eve_layer_bytes: int  # of which in the decoder layers
    lm_weight_bytes: int
    lm_layer_bytes: int
    decode_weight_bytes: int
    prefill: List[PrefillResult] = field(default_factory=list)
    decode: List[DecodeResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        precision = f"{self.bits}-bit ({self.dtype})" if self.bits else self.dtype
        depth = f"{self.layers}" if self.layers == self.full_layers else f"{self.layers} of {self.full_layers}"
        return f"{self.shape} {precision}, {depth} layers"

    @property
    def depth_scale(self) -> float:
        return self.full_layers / self.layers

    def default_prefill(self) -> Optional[PrefillResult]:
        """The image prompt at the model's default resolution (the largest one measured if it was not)."""
        if not self.prefill:
            return None
        default = SHAPES[self.shape].image_sizes[0]
        exact = [p for p in self.prefill if p.image_size == default]
        return exact[0] if exact else max(self.prefill, key=lambda p: p.image_tokens)

    def patch_share(self, p: PrefillResult) -> float:
        """Patch embedding ÷ EVE's time to first token, for the full-depth model: prefill time is per layer."""
        return p.patch_s / (p.patch_s + p.eve_s * self.depth_scale)

    def memory_ratio(self, side: str) -> Optional[float]:
        """Peak ÷ (weights + KV) for the full-depth model at the default resolution. Activations do not grow
        with depth; weights in the layers and the KV cache grow with it."""
        p = self.default_prefill()
        if p is None:
            return None
        weights, layer_weights, peak = (
            (self.eve_weight_bytes, self.eve_layer_bytes, p.eve_peak_bytes)
            if side == "eve"
            else (self.lm_weight_bytes, self.lm_layer_bytes, p.lm_peak_bytes)
        )
        weights += layer_weights * (self.depth_scale - 1)
        kv = p.kv_bytes * self.depth_scale
        return (weights + peak - p.kv_bytes + kv) / (weights + kv)

    def targets(self) -> List[Tuple[str, float, bool]]:
        """(target, measured, met) for every target this run measured."""
        checks = []
        if self.decode:
            worst = min(d.ratio for d in self.decode)
            checks.append((f"decode tokens/s ÷ mlx-lm's >= {TARGETS['decode']}", worst, worst >= TARGETS["decode"]))
        p = self.default_prefill()
        if p is not None:
            worst = min(q.ratio for q in self.prefill)
            target = TARGETS["prefill"]
            checks.append((f"image prefill tokens/s ÷ mlx-lm's >= {target}", worst, worst >= target))
            share, target = self.patch_share(p), TARGETS["patch_share"]
            checks.append((f"patch embedding ÷ time to first token <= {target}", share, share <= target))
            memory, target = self.memory_ratio("eve"), TARGETS["memory"]
            checks.append((f"peak memory ÷ (weights + KV cache) <= {target}", memory, memory <= target))
            if p.blend_speedup is not None:
                target = TARGETS["blend_speedup"]
                checks.append(
                    (
                        f"split layers' prefill speedup over the reference blend >= {target}",
                        p.blend_speedup,
                        p.blend_speedup >= target,
                    )
                )
        return checks

    def to_dict(self) -> dict:
        out = asdict(self)
        for p, d in zip(self.prefill, out["prefill"]):
            d.update(ratio=p.ratio, blend_speedup=p.blend_speedup, patch_share=self.patch_share(p))
        for r, d in zip(self.decode, out["decode"]):
            d["ratio"] = r.ratio
        out["memory_ratio"] = {"eve": self.memory_ratio("eve"), "mlx_lm": self.memory_ratio("lm")}
        out["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in self.targets()]
        return out


def bandwidth_matrix(nbytes: int = 1 << 30) -> mx.array:
    """A float32 matrix of ``nbytes`` to time memory reads with."""
    matrix = mx.arange(nbytes // 4, dtype=mx.float32).reshape(-1, 4096)
    mx.eval(matrix)
    return matrix


def read_once(matrix: mx.array) -> Run:
    """Read ``matrix`` once with a matrix-vector product: how a decode step reads a Linear's weight."""
    vector = mx.ones((1, matrix.shape[1]))
    mx.eval(vector)
    tic = time.perf_counter()
    mx.eval(vector @ matrix.T)
    return Run(time.perf_counter() - tic)


def measure_bandwidth(matrix: mx.array, repeats: int = 5) -> Dict[str, float]:
    """Best bytes/s over ``repeats`` of a reduction, a copy and a matrix-vector product over ``matrix``."""
    flat = matrix.reshape(-1)
    tests = {
        "reduction": (lambda: mx.sum(flat), matrix.nbytes),
        "copy": (lambda: flat + 1, 2 * matrix.nbytes),
        "matrix-vector": (lambda: mx.ones((1, matrix.shape[1])) @ matrix.T, matrix.nbytes),
    }
    rates = {}
    for name, (op, moved) in tests.items():
        mx.eval(op())
        best = math.inf
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(op())
            best = min(best, time.perf_counter() - tic)
        rates[name] = moved / best
    return rates


def compare_prefill(
    eve: EVEModel,
    lm: nn.Module,
    blend: Optional[ReferenceBlend],
    ids: mx.array,
    pixels: mx.array,
    step: int,
    warmup: int,
    repeats: int,
) -> PrefillResult:
    """One image prompt: EVE from pixels, mlx-lm (and the reference blend) from EVE's prompt embeddings."""
    embeddings = eve.embed_inputs(ids, [pixels])
    mx.eval(embeddings)
    runs = {
        "eve": lambda: prefill_once(eve, ids, lambda: eve.embed_inputs(ids, [pixels]), step),
        "lm": lambda: prefill_once(lm, ids, lambda: embeddings, step),
    }
    if blend is not None:
        runs["blend"] = lambda: prefill_once(blend, ids, lambda: embeddings, step)
    times = take_turns(runs, warmup, repeats)
    result = PrefillResult(
        pixels.shape[0],
        int((np.asarray(ids) == IMAGE_TOKEN_ID).sum()),
        ids.size,
        patch_s=fastest(times["eve"], "embed_seconds"),
        eve_s=fastest(times["eve"]),
        lm_s=fastest(times["lm"]),
        median_ratio=median_ratio(times["lm"], times["eve"]),
        eve_peak_bytes=max(r.peak_bytes for r in times["eve"]),
        lm_peak_bytes=max(r.peak_bytes for r in times["lm"]),
        kv_bytes=times["eve"][0].kv_bytes,
    )
    if blend is not None:
        result.blend_s = fastest(times["blend"])
        result.median_blend_speedup = median_ratio(times["blend"], times["eve"])
    return result


def compare_decode(
    eve: EVEModel,
    lm: nn.Module,
    context: int,
    head_dim: int,
    dtype: mx.Dtype,
    tokens: int,
    warmup: int,
    repeats: int,
    probe: Optional[mx.array] = None,
) -> DecodeResult:
    """Decoding from the same ``context`` cached tokens; ``probe`` is read between runs to time memory reads
    under the same conditions."""
    eve_cache, lm_cache = filled_caches([eve, lm], context, head_dim, dtype)
    runs = {"eve": lambda: decode_once(eve, eve_cache, tokens), "lm": lambda: decode_once(lm, lm_cache, tokens)}
    if probe is not None:
        runs["read"] = lambda: read_once(probe)
    times = take_turns(runs, warmup, repeats)
    kv_read = sum(c.keys.nbytes + c.values.nbytes for c in eve_cache) * context // eve_cache[0].keys.shape[2]
    return DecodeResult(
        context,
        eve_tps=tokens / fastest(times["eve"]),
        lm_tps=tokens / fastest(times["lm"]),
        median_ratio=median_ratio(times["lm"], times["eve"]),
        bytes_per_token=decode_weight_bytes(eve) + kv_read,
        bandwidth=max(probe.nbytes / r.seconds for r in times["read"]) if probe is not None else None,
    )


def benchmark(
    shape: str,
    dtype: str = "float32",
    bits: int = 0,
    group_size: int = 64,
    layers: Optional[int] = None,
    image_sizes: Optional[Sequence[int]] = None,
    context_lengths: Sequence[int] = (256, 1024, 4096),
    decode_tokens: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    prefill_step_size: int = 2048,
    blend: bool = True,
    seed: int = 0,
    probe: Optional[mx.array] = None,
    log: Callable[[str], None] = print,
) -> Result:
    """Measure one shape and precision, EVE and mlx-lm side by side (see the module docstring)."""
    spec = SHAPES[shape]
    full_layers = spec.config["num_hidden_layers"]
    config = shape_config(shape, None if layers is None else min(layers, full_layers))
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    eve, lm = build_models(config, DTYPES[dtype], bits, group_size, spec.tokenizer_size)
    result = Result(
        shape, dtype, bits, config["num_hidden_layers"], full_layers,
        parameter_bytes(eve), parameter_bytes(eve, "model.layers."),
        parameter_bytes(lm), parameter_bytes(lm, "model.layers."), decode_weight_bytes(eve),
    )  # fmt: skip
    log(f"\n== {result.name}: {spec.description} ==")
    log(
        f"weights: EVE {_gb(result.eve_weight_bytes)}, mlx-lm {_gb(result.lm_weight_bytes)} (shared with EVE), "
        f"read per decode token {_gb(result.decode_weight_bytes)}"
    )
    has_visual_copies = any(".moe_" in k for k, _ in tree_flatten(eve.parameters()))
    blend_model = ReferenceBlend(eve) if blend and has_visual_copies else None
    stride = token_stride(config)
    for side in spec.image_sizes if image_sizes is None else image_sizes:
        side = max(side // stride, 1) * stride
        ids = image_prompt(image_tokens(side, stride), spec.tokenizer_size or config["vocab_size"], rng)
        pixels = mx.random.normal((side, side, 3))
        p = compare_prefill(eve, lm, blend_model, ids, pixels, prefill_step_size, warmup, repeats)
        result.prefill.append(p)
        blend_text = "" if p.blend_s is None else f", blend {p.blend_s:.3f} s (split {p.blend_speedup:.2f}x faster)"
        log(
            f"image {side}² ({p.image_tokens} image / {p.prompt_tokens} prompt tokens): patch {p.patch_s:.3f} s, "
            f"prefill EVE {p.eve_s:.3f} s, mlx-lm {p.lm_s:.3f} s, ratio {p.ratio:.3f} (median {p.median_ratio:.3f})"
            f"{blend_text}"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for context in context_lengths:
        d = compare_decode(eve, lm, context, head_dim, DTYPES[dtype], decode_tokens, warmup, repeats, probe)
        result.decode.append(d)
        log(
            f"decode at context {context}: EVE {d.eve_tps:.2f} tok/s, mlx-lm {d.lm_tps:.2f} tok/s, "
            f"ratio {d.ratio:.3f} (median {d.median_ratio:.3f})"
        )
    return result


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3f} GB"


def report(results: Sequence[Result], bandwidth: Optional[Dict[str, float]] = None) -> str:
    """Markdown tables of every result and its targets."""
    lines = [
        "Times and speeds are those of the fastest repeat (other processes can only add time); ratios marked "
        "(medians) are medians of the ratios within each repeat, for comparison."
    ]
    for r in results:
        lines += ["", f"### {r.name}", ""]
        if r.layers != r.full_layers:
            lines += [
                f"Patch share and memory are given for the full {r.full_layers}-layer model: prefill time, layer "
                "weights and KV cache scale with depth, activations do not. mlx-lm's prefill only reads the last "
                "token's logits, so lazy evaluation skips the last layer's attention output and MLP for the other "
                "tokens: prefill times undercount a cut model's layers by up to one (use 4 or more).",
                "",
            ]
        if r.prefill:
            lines += [
                "| image | image / prompt tokens | patch embed s | EVE prefill tok/s | mlx-lm prefill tok/s | ratio "
                "| ratio (medians) | EVE TTFT s | patch / TTFT | blend prefill s | split speedup | (medians) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for p in r.prefill:
                blend = "– | – | –"
                if p.blend_s is not None:
                    blend = f"{p.blend_s:.3f} | {p.blend_speedup:.2f}x | {p.median_blend_speedup:.2f}x"
                lines.append(
                    f"| {p.image_size}² | {p.image_tokens} / {p.prompt_tokens} | {p.patch_s:.3f} "
                    f"| {p.prompt_tokens / p.eve_s:.1f} | {p.prompt_tokens / p.lm_s:.1f} | {p.ratio:.3f} "
                    f"| {p.median_ratio:.3f} | {p.patch_s + p.eve_s:.3f} | {r.patch_share(p):.1%} | {blend} |"
                )
            ordered = sorted(r.prefill, key=lambda p: p.prompt_tokens)
            if len(ordered) > 1:
                lines += ["", "Prefill time against prompt length (time ∝ tokens^k between neighbouring sizes):", ""]
            for a, b in zip(ordered, ordered[1:]):
                growth = math.log(b.prompt_tokens / a.prompt_tokens)
                k_eve, k_lm = math.log(b.eve_s / a.eve_s) / growth, math.log(b.lm_s / a.lm_s) / growth
                lines.append(
                    f"- {a.prompt_tokens} → {b.prompt_tokens} tokens: EVE k = {k_eve:.2f} "
                    f"({1e3 * a.eve_s / a.prompt_tokens:.2f} → {1e3 * b.eve_s / b.prompt_tokens:.2f} ms/token), "
                    f"mlx-lm k = {k_lm:.2f}"
                )
            p = r.default_prefill()
            lines += [
                "",
                f"Peak memory at {p.image_size}² (weights + what the run added on top): EVE "
                f"{_gb(r.eve_weight_bytes)} + {_gb(p.eve_peak_bytes)}, mlx-lm {_gb(r.lm_weight_bytes)} + "
                f"{_gb(p.lm_peak_bytes)}, of which KV cache {_gb(p.kv_bytes)}; ÷ (weights + KV): EVE "
                f"{r.memory_ratio('eve'):.3f}, mlx-lm {r.memory_ratio('lm'):.3f}",
            ]
        if r.decode:
            upfront = max(bandwidth.values()) if bandwidth else 0.0
            lines += [
                "",
                "Decode; the bandwidth limit is (best bandwidth measured) ÷ (bytes read per token):",
                "",
                "| context | EVE tok/s | mlx-lm tok/s | ratio | ratio (medians) | read / token | bandwidth GB/s "
                "| limit tok/s | EVE ÷ limit | mlx-lm ÷ limit |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for d in r.decode:
                best = max(upfront, d.bandwidth or 0.0)
                bounds = "– | – | – | –"
                if best:
                    limit = best / d.bytes_per_token
                    bounds = f"{best / 1e9:.1f} | {limit:.2f} | {d.eve_tps / limit:.2f} | {d.lm_tps / limit:.2f}"
                lines.append(
                    f"| {d.context} | {d.eve_tps:.2f} | {d.lm_tps:.2f} | {d.ratio:.3f} | {d.median_ratio:.3f} "
                    f"| {_gb(d.bytes_per_token)} | {bounds} |"
                )
        lines += ["", "Targets:", ""]
        if r.shape.endswith("-tiny"):
            lines += ["(a smoke-test shape: the targets are set for the real shapes, and only checked there)", ""]
        for target, measured, met in r.targets():
            lines.append(f"- {target}: {measured:.3f} {'met' if met else 'NOT MET'}")
    return "\n".join(lines)


def machine() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or platform.processor() or platform.machine()
    return f"{mx.default_device()} ({name}, {os.cpu_count()} CPUs), {platform.system()}, mlx {mx.__version__}"


def build_parser() -> argparse.ArgumentParser:
    shapes = "".join(f"  {k:8s} {v.description}; images {v.image_sizes}\n" for k, v in SHAPES.items())
    p = argparse.ArgumentParser(
        description="Benchmark mlx-eve against mlx-lm on random-weight models of real shapes, in one run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"shapes (image sizes: sides of square preprocessed images, the first is the default resolution):\n"
            f"{shapes}\n"
            f"The defaults fit a 2-core CPU (float32, with OpenBLAS preloaded on Linux) in about ten minutes:\n"
            f"v2-0.5b with {CPU_LAYERS} real-shaped layers. On a GPU every layer is kept; for example:\n"
            "  python benchmarks/speed.py --shapes v2-0.5b v2-1.5b v2-7b v1-7b --dtype bfloat16 --bits 0 4\n"
            "Pass --image-sizes or --context-lengths with no values to skip prefill or decode."
        ),
    )
    p.add_argument("--shapes", nargs="+", default=["v2-0.5b"], choices=list(SHAPES), help="Model shapes.")
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        choices=list(DTYPES),
        help="Weight and activation dtypes (half precision is slow on MLX's CPU backend).",
    )
    p.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=[0],
        choices=[0, 2, 3, 4, 5, 6, 8],
        help="Weight quantization bits, 0 for none (default 0).",
    )
    p.add_argument("--group-size", type=int, default=64, help="Quantization group size.")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"Decoder layers to build, each of real shape (default: all on a GPU, {CPU_LAYERS} on a CPU).",
    )
    p.add_argument("--image-sizes", nargs="*", type=int, default=None, help="Image sides in pixels.")
    p.add_argument(
        "--context-lengths",
        nargs="*",
        type=int,
        default=[256, 1024, 4096],
        help="KV cache lengths decoding starts from (default 256 1024 4096).",
    )
    p.add_argument("--decode-tokens", type=int, default=8, help="Timed tokens per decode run.")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="Timed repeats; the fastest is reported, with medians of the per-repeat ratios.",
    )
    p.add_argument("--warmup", type=int, default=1, help="Untimed runs before the repeats.")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="Prompt tokens per prefill step.")
    p.add_argument("--no-blend", action="store_true", help="Skip the EVEv2 reference-blend comparison.")
    p.add_argument("--no-bandwidth", action="store_true", help="Skip the memory-bandwidth measurement.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    layers = args.layers
    if layers is None and mx.default_device().type == mx.cpu:
        layers = CPU_LAYERS
    print(f"mlx-eve benchmark on {machine()}; load average {os.getloadavg()[0]:.2f}")
    probe = None if args.no_bandwidth else bandwidth_matrix()
    bandwidth = None if probe is None else measure_bandwidth(probe)
    if bandwidth:
        print("memory bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidth.items()))
    results = []
    for shape, dtype, bits in itertools.product(args.shapes, args.dtype, args.bits):
        results.append(
            benchmark(
                shape,
                dtype,
                bits,
                args.group_size,
                layers,
                args.image_sizes,
                args.context_lengths,
                args.decode_tokens,
                args.repeats,
                args.warmup,
                args.prefill_step_size,
                not args.no_blend,
                args.seed,
                probe,
            )
        )
        mx.clear_cache()  # the models are gone: hand their memory back before the next ones
    print(report(results, bandwidth))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    if args.json:
        with open(args.json, "w") as f:
            summary = {"machine": machine(), "bandwidth": bandwidth, "results": [r.to_dict() for r in results]}
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
