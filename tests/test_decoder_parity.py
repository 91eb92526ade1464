"""The decoders against independent implementations: transformers' LLaMA / Qwen2, and the reference's
EVEv2 compute-both-branches-and-blend layer written out in torch from DESIGN.md §4."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mlx_eve import load
from mlx_eve.models import IMAGE_TOKEN_ID

ATOL = 2e-4  # float32 on both sides


def checkpoint_state(path) -> dict:
    state = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        state.update(load_file(shard))
    return state


def hf_decoder(path, family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = json.loads((path / "config.json").read_text())
    common = dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=False,
        rope_theta=config["rope_theta"],
    )
    if family == "v1":
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    state = {
        k: v
        for k, v in checkpoint_state(path).items()
        if k.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head"))
        and ".moe_" not in k
        and "rotary_emb" not in k
    }
    model.load_state_dict(state, strict=True)
    return model.eval().float()


def hf_logits(model, input_ids=None, embeddings=None) -> np.ndarray:
    with torch.no_grad():
        if embeddings is not None:
            out = model(inputs_embeds=torch.from_numpy(np.asarray(embeddings))[None])
        else:
            out = model(input_ids=torch.tensor(input_ids)[None])
    return out.logits[0].numpy()


def ours(model, input_ids, embeddings=None) -> np.ndarray:
    ids = mx.array(input_ids)[None]
    return np.asarray(model(ids, input_embeddings=None if embeddings is None else embeddings[None])[0])


def test_v1_text_matches_llama(v1_model, v1_path):
    model, processor = v1_model
    ids = processor("Count the shapes.\nThen name them.").input_ids.tolist()
    reference = hf_logits(hf_decoder(v1_path, "v1"), ids)
    np.testing.assert_allclose(ours(model, ids), reference, atol=ATOL)


def test_v1_image_prompt_matches_llama_fed_the_same_embeddings(v1_model, v1_path, images):
    model, processor = v1_model
    inputs = processor("What is in the image?", images=[images["wide"]])
    embeddings = model.embed_inputs(inputs.input_ids, inputs.pixel_values)
    reference = hf_logits(hf_decoder(v1_path, "v1"), embeddings=embeddings)
    np.testing.assert_allclose(ours(model, inputs.input_ids.tolist(), embeddings), reference, atol=ATOL)


def test_v2_text_matches_qwen2(v2_model, v2_path):
    model, processor = v2_model
    ids = processor("Count the shapes.\nThen name them.").input_ids.tolist()
    reference = hf_logits(hf_decoder(v2_path, "v2"), ids)
    vocab = model.vocab_limit
    assert vocab == 403 and reference.shape[-1] == 416
    np.testing.assert_allclose(ours(model, ids), reference[:, :vocab], atol=ATOL)


def _v2_image_inputs(model, processor, image):
    inputs = processor("What is in the image?", images=[image])
    embeddings = model.embed_inputs(inputs.input_ids, inputs.pixel_values)
    return inputs.input_ids.tolist(), embeddings


def test_v2_with_equal_branches_matches_qwen2_on_an_image_prompt(v2_path, images):
    model, processor = load(str(v2_path))
    for layer in model.layers:  # visual copies := text weights
        for owner, names in (
            (layer, ["mlp", "input_layernorm", "post_attention_layernorm"]),
            (layer.self_attn, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ):
            for name in names:
                owner["moe_" + name].update(owner[name].parameters())
    ids, embeddings = _v2_image_inputs(model, processor, images["tall"])
    reference = hf_logits(hf_decoder(v2_path, "v2"), embeddings=embeddings)
    np.testing.assert_allclose(ours(model, ids, embeddings), reference[:, : model.vocab_limit], atol=ATOL)


def reference_blend_forward(state: dict, config: dict, embeddings: np.ndarray, visual: np.ndarray) -> np.ndarray:
    """EVEv2 as the reference computes it: every sub-layer runs both copies on all tokens and blends them
    with the visual-token mask (``moe_function``); one causal attention over everything."""
    D, H, KV = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps = D // H, config["rms_norm_eps"]
    mask = torch.from_numpy(visual.astype(np.float32))[:, None]
    h = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    L = h.shape[0]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def linear(name):
        return lambda x: F.linear(x, state[name + ".weight"], state.get(name + ".bias"))

    def blend(x, text_fn, visual_fn):
        return text_fn(x) * (1.0 - mask) + visual_fn(x) * mask

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(L, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()

    def rope(x):  # x: (heads, L, hd), rotate-half convention
        half = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + half * sin

    def norm(name):
        return lambda x: rms(x, state[name + ".weight"])

    def mlp(m):
        return lambda x: linear(m + ".down_proj")(F.silu(linear(m + ".gate_proj")(x)) * linear(m + ".up_proj")(x))

    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = blend(h, norm(p + "input_layernorm"), norm(p + "moe_input_layernorm"))
        q, k, v = (blend(x, linear(p + f"self_attn.{n}_proj"), linear(p + f"self_attn.moe_{n}_proj")) for n in "qkv")
        q = rope(q.view(L, H, hd).transpose(0, 1))
        k = rope(k.view(L, KV, hd).transpose(0, 1)).repeat_interleave(H // KV, 0)
        v = v.view(L, KV, hd).transpose(0, 1).repeat_interleave(H // KV, 0)
        attention = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        attention = attention.transpose(0, 1).reshape(L, D)
        h = h + blend(attention, linear(p + "self_attn.o_proj"), linear(p + "self_attn.moe_o_proj"))
        x = blend(h, norm(p + "post_attention_layernorm"), norm(p + "moe_post_attention_layernorm"))
        h = h + blend(x, mlp(p + "mlp"), mlp(p + "moe_mlp"))
    return F.linear(rms(h, state["model.norm.weight"]), state["lm_head.weight"]).numpy()


def test_v2_split_layers_match_the_reference_blend_and_not_qwen2(v2_model, v2_path, images):
    model, processor = v2_model
    ids, embeddings = _v2_image_inputs(model, processor, images["wide"])
    config = json.loads((v2_path / "config.json").read_text())
    visual = np.array(ids) == IMAGE_TOKEN_ID
    assert visual.sum() > 0 and (~visual).sum() > 0
    reference = reference_blend_forward(checkpoint_state(v2_path), config, embeddings, visual)
    logits = ours(model, ids, embeddings)
    np.testing.assert_allclose(logits, reference[:, : model.vocab_limit], atol=ATOL)
    qwen2 = hf_logits(hf_decoder(v2_path, "v2"), embeddings=embeddings)[:, : model.vocab_limit]
    assert np.abs(logits - qwen2).max() > 0.1  # with distinct visual copies, plain Qwen2 is wrong


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_stay_close_to_float32(checkpoints, images, dtype):
    full, processor = load(str(checkpoints("v2-1600", "v2")))
    half_path = checkpoints(f"v2-{dtype}", "v2", dtype=dtype)
    half, _ = load(str(half_path), dtype=getattr(mx, dtype))  # computed in half precision, not float32
    assert half.model.embed_tokens.weight.dtype == getattr(mx, dtype)
    inputs = processor("What is in the image?", images=[images["square"]], system_prompt="Short.")
    # 1600-pixel default (no preprocessor config): check the token count of a 57x57 image first.
    assert inputs.image_tokens == 1 + 51 * 52
    ids = inputs.input_ids[None]
    a = full(ids, input_embeddings=full.embed_inputs(inputs.input_ids, inputs.pixel_values)[None])[0, -1]
    b = half(ids, input_embeddings=half.embed_inputs(inputs.input_ids, inputs.pixel_values)[None])[0, -1]
    a, b = np.asarray(a), np.asarray(b.astype(mx.float32))
    assert np.argmax(a) == np.argmax(b)
    assert np.abs(a - b).max() < (0.15 if dtype == "float16" else 0.5)
