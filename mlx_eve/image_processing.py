"""EVE image preprocessing: the v1 "anypixel" and v2 "anyratio" resize rules, CLIP normalisation, token counts.

Bit-faithful to ``process_images`` in EVEv1/eve/mm_utils.py and EVEv2/eve/mm_utils.py followed by
transformers' ``CLIPImageProcessor`` (rescale in float64, normalise in float32). For v1 the reference pastes
the resized image on a padded square and crops the valid region back out in the patch embedding layer; the
conv has stride == kernel and the offsets are multiples of the patch size, so we hand over the resized
image itself: the same numbers, without the padding.
"""

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from .errors import CheckpointError, ImageError
from .fields import field_problems

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessor:
    patch_stride: int
    image_mean: Tuple[float, float, float] = CLIP_MEAN
    image_std: Tuple[float, float, float] = CLIP_STD

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        """The (width, height) the image is resized to."""
        raise NotImplementedError

    @property
    def token_stride(self) -> int:
        """Pixels per image token along each side."""
        raise NotImplementedError

    def model_args(self) -> Dict[str, int]:
        """The strides the patch embedding layer is built with."""
        raise NotImplementedError

    def num_tokens(self, width: int, height: int) -> int:
        """Embeddings for an image of this size: a class token, then each row of the grid plus a separator."""
        w, h = self.target_size(width, height)
        cols, rows = w // self.token_stride, h // self.token_stride
        return 1 + rows * (cols + 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image → normalised float32 ``(H, W, 3)``."""
        resized = image.resize(self.target_size(*image.size), Image.BICUBIC)
        pixels = (np.asarray(resized, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
        return (pixels - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)

    def to_dict(self) -> dict:
        return {"image_processor_type": type(self).__name__, **asdict(self)}

    def with_max_size(self, max_size: Optional[int]) -> "ImageProcessor":
        """This processor at another resolution, where the model family allows one (EVEv2)."""
        return self

    @classmethod
    def settings_from_name(cls, name: str) -> dict:
        """The reference's preprocessor folders are named after their settings; the checkpoints only name them."""
        return {}

    @classmethod
    def from_pretrained(cls, model_path: Path, config: dict, max_size: Optional[int] = None) -> "ImageProcessor":
        """From ``preprocessor_config.json`` in the model folder, else from the ``mm_vision_tower`` name.

        ``max_size`` overrides the EVEv2 resolution (ignored for EVEv1, whose sizes are fixed by training).
        """
        settings = _read_settings(model_path, config, cls.settings_from_name)
        settings = {k: v for k, v in settings.items() if k in cls.__dataclass_fields__}
        problems = field_problems(settings, cls)
        if problems:
            raise CheckpointError(f"The image processor settings of {model_path} are wrong: {'; '.join(problems)}.")
        processor = cls(**settings)
        processor.image_mean, processor.image_std = tuple(processor.image_mean), tuple(processor.image_std)
        return processor.with_max_size(max_size)


@dataclass
class AnyPixelProcessor(ImageProcessor):
    """EVEv1: the long side becomes ``image_size``, the short side a multiple of the patch size."""

    patch_stride: int = 14
    image_size: int = 672
    image_size_clip: int = 336
    patch_stride_clip: int = 14
    conv_stride: int = 2

    @property
    def token_stride(self) -> int:
        return self.patch_stride * self.conv_stride

    def model_args(self) -> Dict[str, int]:
        return {"patch_stride": self.patch_stride, "conv_stride": self.conv_stride}

    @classmethod
    def settings_from_name(cls, name: str) -> dict:
        if match := re.fullmatch(r"eve-patch(\d+)-anypixel-(\d+)", name):
            return {"patch_stride": int(match[1]), "image_size": int(match[2])}
        return {}

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        S, p = self.image_size_clip, self.patch_stride_clip
        ratio = self.image_size // S
        # Same expressions, same order as compute_basehw in EVEv1/eve/mm_utils.py.
        if width > height:
            new_width = S
            new_height = int(math.ceil(S * height / width / p)) * p
        else:
            new_height = S
            new_width = int(math.ceil(S * width / height / p)) * p
        return new_width * ratio, new_height * ratio


@dataclass
class AnyRatioProcessor(ImageProcessor):
    """EVEv2: scaled (up or down) to about ``max_size²`` pixels, sides rounded up to multiples of 32."""

    patch_stride: int = 16
    max_size: int = 1600
    dense_stride: int = 2

    @property
    def token_stride(self) -> int:
        return self.patch_stride * self.dense_stride

    def model_args(self) -> Dict[str, int]:
        return {"patch_stride": self.patch_stride, "dense_stride": self.dense_stride}

    @classmethod
    def settings_from_name(cls, name: str) -> dict:
        if match := re.fullmatch(r"eve-anyratio-res(\d+)-patch(\d+)", name):
            return {"max_size": int(match[1]), "patch_stride": int(match[2])}
        return {}

    def with_max_size(self, max_size: Optional[int]) -> "AnyRatioProcessor":
        if max_size is None:
            return self
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < self.token_stride:
            raise ImageError(
                f"The image resolution (max_size) must be an integer of at least {self.token_stride}, not {max_size!r}."
            )
        return replace(self, max_size=max_size)

    def target_size(self, width: int, height: int) -> Tuple[int, int]:
        # Same expressions, same order as process_images in EVEv2/eve/mm_utils.py.
        scale = math.sqrt(width * height) / self.max_size
        e = self.token_stride
        return (
            max(int(math.ceil(width / scale / e)) * e, e),
            max(int(math.ceil(height / scale / e)) * e, e),
        )


def _read_settings(model_path: Path, config: dict, from_name: Callable[[str], dict]) -> dict:
    """``preprocessor_config.json`` of the model folder, else the settings its ``mm_vision_tower`` names."""
    file = model_path / "preprocessor_config.json"
    if file.exists():
        try:
            settings = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is not valid JSON: {e}") from e
        if not isinstance(settings, dict):
            raise CheckpointError(f"{file} should hold a JSON object, not a {type(settings).__name__}.")
        if "image_size" not in settings and isinstance(settings.get("crop_size"), (int, dict)):
            crop = settings["crop_size"]
            settings["image_size"] = crop["height"] if isinstance(crop, dict) else crop
        return settings
    tower = config.get("mm_vision_tower", "")
    settings = from_name(tower.rstrip("/").split("/")[-1])
    if not settings:
        raise CheckpointError(
            f"{model_path} has no preprocessor_config.json and its mm_vision_tower {tower!r} is not a "
            "known EVE preprocessor name (eve-patch14-anypixel-672/1344, eve-anyratio-res1600-patch16); "
            "add a preprocessor_config.json to the model folder."
        )
    return settings
