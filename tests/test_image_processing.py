"""Resize rules, token counts and normalisation against hand-computed values and transformers' CLIP processor."""

import numpy as np
import pytest
from PIL import Image

from mlx_eve.families import family_of
from mlx_eve.image_processing import AnyPixelProcessor, AnyRatioProcessor

# (width, height) → (resized width, resized height, tokens), worked out by hand from DESIGN.md §3:
# W > H: w' = 336, h' = ceil(336·H/W/14)·14, both ×(image_size/336); tokens = 1 + h·(w+1) with 28-pixel cells.
V1_CASES_672 = [
    ((320, 240), (672, 504, 1 + 18 * 25)),  # 336·240/320/14 = 18 exactly
    ((240, 320), (504, 672, 1 + 24 * 19)),  # portrait: the height becomes 336
    ((57, 57), (672, 672, 1 + 24 * 25)),  # square takes the portrait branch: 601, the maximum
    ((1000, 999), (672, 672, 601)),  # ceil(23.976) = 24
    ((500, 100), (672, 140, 1 + 5 * 25)),  # ceil(4.8) = 5
    ((1, 1000), (28, 672, 1 + 24 * 2)),  # ceil(0.024) = 1 patch
]
V1_CASES_1344 = [((320, 240), (1344, 1008, 1 + 36 * 49)), ((64, 64), (1344, 1344, 2353))]

# EVEv2 (DESIGN.md §4): s = sqrt(W·H)/M; W' = max(ceil(W/s/32)·32, 32); tokens = 1 + (H'/32)·(W'/32 + 1).
V2_CASES_1600 = [
    ((320, 240), (1856, 1408, 1 + 44 * 59)),  # 320/0.1732/32 = 57.7 → 58; 240/0.1732/32 = 43.3 → 44
    ((1600, 1600), (1600, 1600, 1 + 50 * 51)),  # s = 1: exactly 50 cells
    # 57/(57/1600) evaluates to 1600.0000000000002 in float64, so ceil(50.000000000000007) = 51.
    ((57, 57), (1632, 1632, 1 + 51 * 52)),
    ((100, 100), (1600, 1600, 2551)),  # here the division is exact
    ((1920, 1080), (2144, 1216, 1 + 38 * 68)),  # s = 0.9: 66.7 → 67 cells wide, 37.5 → 38 high
    ((1, 10000), (32, 160000, 1 + 5000 * 2)),  # width rounds up to one 32-pixel cell
]
V2_CASES_800 = [((320, 240), (928, 704, 1 + 22 * 30))]


def _check(processor, cases):
    for (w, h), (tw, th, tokens) in cases:
        assert processor.target_size(w, h) == (tw, th), (w, h)
        assert processor.num_tokens(w, h) == tokens, (w, h)


def test_v1_sizes_and_token_counts():
    _check(AnyPixelProcessor(image_size=672), V1_CASES_672)
    _check(AnyPixelProcessor(image_size=1344), V1_CASES_1344)


def test_v2_sizes_and_token_counts():
    _check(AnyRatioProcessor(max_size=1600), V2_CASES_1600)
    _check(AnyRatioProcessor(max_size=800), V2_CASES_800)


@pytest.mark.parametrize("processor", [AnyPixelProcessor(image_size=672), AnyRatioProcessor(max_size=448)])
def test_pixels_match_transformers_clip_processor(processor):
    """Bicubic resize, then transformers' CLIPImageProcessor (rescale + normalise, no resize/crop)."""
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8))
    clip = CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        image_mean=list(processor.image_mean),
        image_std=list(processor.image_std),
    )
    resized = image.resize(processor.target_size(*image.size), Image.BICUBIC)
    expected = clip.preprocess(resized, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = processor(image)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def load_image_processor(path, config, max_size=None):
    """The image processor of the config's family, as ``load`` makes it."""
    return family_of(config["model_type"]).image_processor.from_pretrained(path, config, max_size)


def test_processor_config_from_file_name_and_override(tmp_path):
    v1 = load_image_processor(tmp_path, {"model_type": "eve", "mm_vision_tower": "openai/eve-patch14-anypixel-1344"})
    assert isinstance(v1, AnyPixelProcessor) and v1.image_size == 1344 and v1.patch_stride == 14
    v2 = load_image_processor(
        tmp_path, {"model_type": "eve-qwen2", "mm_vision_tower": "openai/eve-anyratio-res800-patch16"}
    )
    assert isinstance(v2, AnyRatioProcessor) and v2.max_size == 800
    assert (
        load_image_processor(
            tmp_path, {"model_type": "eve-qwen2", "mm_vision_tower": "x/eve-anyratio-res1600-patch16"}, max_size=640
        ).max_size
        == 640
    )
    (tmp_path / "preprocessor_config.json").write_text('{"max_size": 512, "patch_stride": 16, "dense_stride": 2}')
    assert load_image_processor(tmp_path, {"model_type": "eve-qwen2", "mm_vision_tower": "unknown"}).max_size == 512


def test_unknown_preprocessor_is_a_clear_error(tmp_path):
    from mlx_eve.errors import CheckpointError

    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        load_image_processor(tmp_path, {"model_type": "eve", "mm_vision_tower": "openai/some-other-tower"})
