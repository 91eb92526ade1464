"""Tiny random EVE checkpoints in the exact layout of the original Hugging Face releases.

Config fields, weight names (PyTorch conv layout, training-only extras included), a trained SentencePiece
tokenizer for EVEv1 and a byte-level BPE tokenizer for EVEv2, generation and preprocessor configs; weights
as sharded ``.safetensors`` or sharded ``pytorch_model-*.bin``. Run as a script to write one:

    python tests/tiny_checkpoints.py v2 /tmp/eve-v2-tiny-random --max-size 448
"""

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    SYSTEM,
    "USER: <image>\nWhat is in the image? ASSISTANT: A red circle on a white background.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes: a square, a triangle and a circle.",
    "Where is the blue square? It is in the top left corner, next to the green triangle.",
    "The quick brown fox jumps over the lazy dog. 0123456789 Hello, world! What colour is it?",
    "Describe the picture in detail.\nList every object, its colour and its position.",
]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def v1_config(**overrides) -> dict:
    config = {
        "_name_or_path": "checkpoints/eve-7b-fitu-672-mse",
        "architectures": ["EVELlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": 64,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": 192,
        "max_position_embeddings": 4096,
        "mm_hidden_size": 32,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/eve-patch14-anypixel-672",
        "mm_vision_tower_clip": "openai/clip-vit-large-patch14-336",
        "model_type": "eve",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "requires_cliploss": True,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": 400,
    }
    config.update(overrides)
    return config


def v2_config(**overrides) -> dict:
    config = {
        "_name_or_path": "checkpoints/EVEv2-7B-HD",
        "add_moe": True,
        "architectures": ["EVEQwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 400,
        "eos_token_id": 402,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "mm_hidden_size": 32,
        "mm_vision_tower": "openai/eve-anyratio-res1600-patch16",
        "model_type": "eve-qwen2",
        "moe_part": "layernorm-self_attn-mlp",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 8192,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        # Larger than the tokenizer (403), as the real 152064 is larger than Qwen2.5's 151665.
        "vocab_size": 416,
    }
    config.update(overrides)
    return config


def _normal(rng, shape, scale):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _norm(rng, dim):
    return (1.0 + rng.standard_normal(dim) * 0.1).astype(np.float32)


def decoder_weights(config: dict, rng: np.random.Generator, visual_copy: bool = False) -> Dict[str, np.ndarray]:
    """LLaMA/Qwen2 decoder weights (with EVEv2's ``moe_*`` copies when ``visual_copy``)."""
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]  # noqa: E741
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = D // heads
    bias = config["model_type"] == "eve-qwen2"
    w = {"model.embed_tokens.weight": _normal(rng, (V, D), 1.0), "model.norm.weight": _norm(rng, D)}
    w["lm_head.weight"] = _normal(rng, (V, D), D**-0.5 * 2)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for copy in ["", "moe_"] if visual_copy else [""]:
            for name, out in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                w[f"{p}self_attn.{copy}{name}_proj.weight"] = _normal(rng, (out, D), D**-0.5)
                if bias:
                    w[f"{p}self_attn.{copy}{name}_proj.bias"] = _normal(rng, (out,), 0.1)
            w[f"{p}self_attn.{copy}o_proj.weight"] = _normal(rng, (D, heads * hd), D**-0.5)
            mlp = "moe_mlp" if copy else "mlp"
            w[f"{p}{mlp}.gate_proj.weight"] = _normal(rng, (I, D), D**-0.5)
            w[f"{p}{mlp}.up_proj.weight"] = _normal(rng, (I, D), D**-0.5)
            w[f"{p}{mlp}.down_proj.weight"] = _normal(rng, (D, I), I**-0.5)
            w[f"{p}{copy}input_layernorm.weight"] = _norm(rng, D)
            w[f"{p}{copy}post_attention_layernorm.weight"] = _norm(rng, D)
        w[f"{p}self_attn.rotary_emb.inv_freq"] = (1.0 / config["rope_theta"] ** (np.arange(0, hd, 2) / hd)).astype(
            np.float32
        )
    return w


def v1_weights(config: dict, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    C, D = config["mm_hidden_size"], config["hidden_size"]
    w = decoder_weights(config, rng)
    t = "model.vision_tower."
    w[t + "patch_embedding.weight"] = _normal(rng, (C, 3, 14, 14), (3 * 14 * 14) ** -0.5)
    w[t + "class_embedding"] = _normal(rng, (C,), 1.0)
    w[t + "split_embedding"] = _normal(rng, (C,), 1.0)
    for attn in ("local_attention", "global_attention"):
        for part, out in (("q", C), ("kv", 2 * C)):
            w[f"{t}{attn}.{part}.0.weight"] = _norm(rng, C)
            w[f"{t}{attn}.{part}.0.bias"] = _normal(rng, (C,), 0.1)
            w[f"{t}{attn}.{part}.1.weight"] = _normal(rng, (out, C), C**-0.5 * 3)
        w[f"{t}{attn}.proj.weight"] = _normal(rng, (C, C), C**-0.5)
        w[f"{t}{attn}.proj.bias"] = _normal(rng, (C,), 0.1)
    w["model.mm_projector.0.weight"] = _normal(rng, (D, C), C**-0.5)
    w["model.mm_projector.0.bias"] = _normal(rng, (D,), 0.1)
    w["model.mm_projector.2.weight"] = _normal(rng, (D, D), D**-0.5)
    w["model.mm_projector.2.bias"] = _normal(rng, (D,), 0.1)
    # Training-only modules saved with the released checkpoints (CLIP teacher, patch aligning layer).
    w["model.vision_clip.vision_model.embeddings.class_embedding"] = _normal(rng, (48,), 1.0)
    w["model.vision_clip.vision_model.embeddings.patch_embedding.weight"] = _normal(rng, (48, 3, 14, 14), 0.02)
    w["model.vision_tower_compressor.input_layer.weight"] = _normal(rng, (48, D), 0.02)
    w["model.vision_tower_compressor.norm_layer.0.0.weight"] = _norm(rng, D)
    return w


def v2_weights(config: dict, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    C, D = config["mm_hidden_size"], config["hidden_size"]
    w = decoder_weights(config, rng, visual_copy=True)
    t = "model.vision_tower."
    w[t + "patch_embedding.0.weight"] = _normal(rng, (C, 3, 16, 16), (3 * 16 * 16) ** -0.5)
    w[t + "patch_embedding.0.bias"] = _normal(rng, (C,), 0.1)
    w[t + "patch_embedding.2.weight"] = _normal(rng, (D, C, 2, 2), (4 * C) ** -0.5)
    w[t + "patch_embedding.2.bias"] = _normal(rng, (D,), 0.1)
    w[t + "class_embedding"] = _normal(rng, (D,), 1.0)
    w[t + "split_embedding"] = _normal(rng, (D,), 1.0)
    return w


def write_weights(
    weights: Dict[str, np.ndarray], out: Path, fmt: str = "safetensors", shards: int = 2, dtype="float32"
):
    """Sharded ``model-0000i-of-0000n.safetensors`` or ``pytorch_model-0000i-of-0000n.bin`` plus the index."""
    keys = sorted(weights)
    groups = [keys[i::shards] for i in range(shards)]
    prefix, suffix, index_name = {
        "safetensors": ("model", "safetensors", "model.safetensors.index.json"),
        "bin": ("pytorch_model", "bin", "pytorch_model.bin.index.json"),
    }[fmt]
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"{prefix}-{i:05d}-of-{shards:05d}.{suffix}"
        if fmt == "safetensors":
            import mlx.core as mx

            arrays = {k: mx.array(weights[k]).astype(getattr(mx, dtype)) for k in group}
            mx.save_safetensors(str(out / name), arrays, metadata={"format": "pt"})
        else:
            import torch

            tensors = {k: torch.from_numpy(weights[k]).to(getattr(torch, dtype)) for k in group}
            torch.save(tensors, out / name)
        for k in group:
            weight_map[k] = name
            total += weights[k].size * (4 if dtype == "float32" else 2)
    (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_v1_tokenizer(out: Path, vocab_size: int = 400, legacy: Optional[bool] = None) -> None:
    import sentencepiece as spm

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()

    def token(s):
        return {
            "__type": "AddedToken",
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token("</s>"),
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": token("<unk>"),
    }
    if legacy is not None:
        config["legacy"] = legacy
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def write_v2_tokenizer(out: Path, vocab_size: int = 400) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"The corpus only yields {tokenizer.get_vocab_size()} BPE tokens, not {vocab_size}.")
    tokenizer.add_special_tokens(QWEN2_SPECIAL)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.model.save(str(out))  # vocab.json, merges.txt
    base = tokenizer.get_vocab_size(with_added_tokens=False)
    added = {
        str(base + i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(QWEN2_SPECIAL)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "added_tokens.json").write_text(json.dumps({s: base + i for i, s in enumerate(QWEN2_SPECIAL)}, indent=2))
    special = {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def build(
    family: str,
    out: Path,
    fmt: str = "safetensors",
    seed: int = 0,
    dtype: str = "float32",
    preprocessor: Optional[dict] = None,
    tokenizer_from: Optional[Path] = None,
    **config_overrides,
) -> Path:
    """Write a tiny ``family`` ("v1" or "v2") checkpoint to ``out``.

    ``preprocessor``: contents of ``preprocessor_config.json``; None leaves it out, as the real releases do
    (the loader then derives it from ``mm_vision_tower``). ``tokenizer_from`` copies tokenizer files
    from an earlier build instead of training again.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if family == "v1":
        config = v1_config(torch_dtype=dtype, **config_overrides)
        weights = v1_weights(config, rng)
        generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}
    else:
        config = v2_config(torch_dtype=dtype, **config_overrides)
        weights = v2_weights(config, rng)
        generation = {"bos_token_id": 400, "eos_token_id": [402, 400], "pad_token_id": 400, "do_sample": False}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if preprocessor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges")):
                shutil.copy(f, out / f.name)
    elif family == "v1":
        write_v1_tokenizer(out, config["vocab_size"])
    else:
        write_v2_tokenizer(out)
    write_weights(weights, out, fmt, dtype=dtype)
    return out


def v1_preprocessor(image_size: int = 672) -> dict:
    """What the reference's ``openai/eve-patch14-anypixel-<size>`` folder holds for CLIPImageProcessor."""
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": image_size,
        "image_size": image_size,
        "image_size_clip": 336,
        "patch_stride": 14,
        "conv_stride": 2,
        "patch_stride_clip": 14,
    }


def v2_preprocessor(max_size: int = 1600) -> dict:
    """EVEv2/openai/eve-anyratio-res1600-patch16/preprocessor_config.json, with a chosen ``max_size``."""
    return {
        "do_center_crop": False,
        "do_normalize": True,
        "do_resize": False,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "max_size": max_size,
        "patch_stride": 16,
        "dense_stride": 2,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=["v1", "v2"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-size", type=int, default=None, help="v2: write a preprocessor config with it")
    args = parser.parse_args()
    pre = v2_preprocessor(args.max_size) if args.family == "v2" and args.max_size else None
    print(build(args.family, args.out, args.format, args.seed, args.dtype, pre))
