"""Patch embedding layers against numpy implementations written from DESIGN.md §3–4.

For EVEv1 the numpy path follows the reference end to end: paste on the padded square canvas, build the
0/1 mask, convolve the whole canvas, crop to the mask's patches, then attend. Ours skips the padding.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from mlx_eve.image import load_image

erf = np.vectorize(math.erf)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def weights_of(path) -> dict:
    state = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        state.update(load_file(shard))
    return {k: v.astype(np.float64) for k, v in state.items()}


def gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def conv_stride_eq_kernel(x, weight, bias=None):
    """x (H, W, Cin), weight (Cout, Cin, k, k) PyTorch layout → (H/k, W/k, Cout)."""
    k = weight.shape[-1]
    H, W, Cin = x.shape
    patches = x.reshape(H // k, k, W // k, k, Cin).transpose(0, 2, 4, 1, 3).reshape(H // k, W // k, -1)
    out = patches @ weight.reshape(weight.shape[0], -1).T
    return out if bias is None else out + bias


def v1_reference_pixels(image: Image.Image, image_size=672, S=336, p=14):
    """Resize, paste on the (122, 116, 104) canvas, normalise; the mask marks the pasted rows/columns."""
    W, H = image.size
    r = image_size // S
    if W > H:
        val = math.ceil(S * H / W / p)
        size, offset = (S * r, val * p * r), (0, (S // p - val) // 2 * p * r)
    else:
        val = math.ceil(S * W / H / p)
        size, offset = (val * p * r, S * r), ((S // p - val) // 2 * p * r, 0)
    canvas = Image.new("RGB", (image_size, image_size), (122, 116, 104))
    canvas.paste(image.resize(size, Image.BICUBIC), offset)
    mask = np.zeros((image_size, image_size))
    mask[offset[1] : offset[1] + size[1], offset[0] : offset[0] + size[0]] = 1
    pixels = (np.asarray(canvas).astype(np.float64) / 255 - MEAN) / STD
    return pixels, mask


def cross_attention(w, prefix, queries, context, heads=8):
    """queries (N, 1, C), context (N, M, C) → queries + proj(attention), scores scaled by C**-0.5."""
    C = queries.shape[-1]
    q = layer_norm(queries, w[prefix + "q.0.weight"], w[prefix + "q.0.bias"]) @ w[prefix + "q.1.weight"].T
    kv = layer_norm(context, w[prefix + "kv.0.weight"], w[prefix + "kv.0.bias"]) @ w[prefix + "kv.1.weight"].T
    k, v = kv[..., :C], kv[..., C:]
    split = lambda x: x.reshape(*x.shape[:2], heads, C // heads)  # noqa: E731
    scores = np.einsum("nqhd,nmhd->nhqm", split(q), split(k)) * C**-0.5
    out = np.einsum("nhqm,nmhd->nqhd", softmax(scores), split(v)).reshape(queries.shape)
    return queries + out @ w[prefix + "proj.weight"].T + w[prefix + "proj.bias"]


def v1_reference_embedding(w, pixels, mask):
    t = "model.vision_tower."
    features = conv_stride_eq_kernel(pixels, w[t + "patch_embedding.weight"])
    patch_mask = mask.reshape(mask.shape[0] // 14, 14, -1, 14).mean((1, 3))
    rows, cols = np.nonzero(patch_mask)
    features = features[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    Hp, Wp, C = features.shape
    h, wd = Hp // 2, Wp // 2
    windows = features.reshape(h, 2, wd, 2, C).transpose(0, 2, 1, 3, 4).reshape(h * wd, 4, C)
    pooled = windows.mean(1, keepdims=True)
    patches = cross_attention(w, t + "local_attention.", pooled, windows).reshape(h * wd, C)
    cls = cross_attention(w, t + "global_attention.", w[t + "class_embedding"][None, None], patches[None])[0]
    grid = np.concatenate([patches.reshape(h, wd, C), np.broadcast_to(w[t + "split_embedding"], (h, 1, C))], 1)
    sequence = np.concatenate([cls, grid.reshape(-1, C)])
    hidden = gelu(sequence @ w["model.mm_projector.0.weight"].T + w["model.mm_projector.0.bias"])
    return hidden @ w["model.mm_projector.2.weight"].T + w["model.mm_projector.2.bias"]


def v2_reference_embedding(w, image: Image.Image, max_size: int):
    W, H = image.size
    s = math.sqrt(W * H) / max_size
    size = (max(math.ceil(W / s / 32) * 32, 32), max(math.ceil(H / s / 32) * 32, 32))
    pixels = (np.asarray(image.resize(size, Image.BICUBIC)).astype(np.float64) / 255 - MEAN) / STD
    t = "model.vision_tower.patch_embedding."
    x = gelu(conv_stride_eq_kernel(pixels, w[t + "0.weight"], w[t + "0.bias"]))
    x = conv_stride_eq_kernel(x, w[t + "2.weight"], w[t + "2.bias"])
    h, wd, C = x.shape
    split = np.broadcast_to(w["model.vision_tower.split_embedding"], (h, 1, C))
    rows = np.concatenate([x, split], 1).reshape(-1, C)
    return np.concatenate([w["model.vision_tower.class_embedding"][None], rows])


@pytest.mark.parametrize("shape", ["wide", "tall", "square", "strip"])
def test_v1_patch_embedding_matches_numpy(v1_model, v1_path, images, shape):
    model, processor = v1_model
    image = load_image(images[shape])
    pixels, mask = v1_reference_pixels(image)
    expected = v1_reference_embedding(weights_of(v1_path), pixels, mask)
    ours = np.asarray(model.encode_image(mx.array(processor.image_processor(image))))
    assert ours.shape == expected.shape == (processor.image_processor.num_tokens(*image.size), 64)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", ["wide", "tall", "square", "strip"])
def test_v2_patch_embedding_matches_numpy(v2_model, v2_path, images, shape):
    model, processor = v2_model
    image = load_image(images[shape])
    expected = v2_reference_embedding(weights_of(v2_path), image, max_size=224)
    ours = np.asarray(model.encode_image(mx.array(processor.image_processor(image))))
    assert ours.shape == expected.shape == (processor.image_processor.num_tokens(*image.size), 64)
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-4)
