"""Turn whatever the user passes as an image into an upright RGB PIL image, or fail with a clear message."""

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .image_fetching import download

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS): beyond it an image is treated as a decompression bomb.
MAX_PIXELS = 178_956_970
MAX_DOWNLOAD_BYTES = 200 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30


def load_image(source: ImageInput) -> Image.Image:
    """Path, URL, raw bytes, PIL image or numpy array → RGB PIL image with its EXIF orientation applied."""
    if isinstance(source, Image.Image):
        image, name = source, "the given image"
    elif isinstance(source, np.ndarray):
        image, name = _from_array(source), "the given array"
    elif isinstance(source, bytes):
        image, name = _open(io.BytesIO(source), "the given bytes"), "the given bytes"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        if name.startswith(("http://", "https://")):
            image = _open(io.BytesIO(download(name, MAX_DOWNLOAD_BYTES, DOWNLOAD_TIMEOUT_S)), name)
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise ImageError(f"Image file not found: {name}")
            image = _open(path, name)
    else:
        raise ImageError(
            f"Unsupported image type {type(source).__name__}: pass a path, URL, bytes, PIL image or numpy array."
        )
    _check_size(image.size, name)
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"Could not read image {name}: {e}") from e


def _open(fp, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own size check below gives the clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
        _check_size(image.size, name)
        image.load()
        return image
    except Image.DecompressionBombError as e:
        raise ImageError(f"Image {name} is too large to decode safely ({e}).") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"Could not read image {name}: not a recognised image file.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Could not read image {name}: the file is corrupt or truncated ({e}).") from e


def _check_size(size, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"Image {name} is empty ({width}x{height} pixels).")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"Image {name} has {width}x{height} = {width * height:,} pixels, more than the "
            f"{MAX_PIXELS:,} allowed (a possible decompression bomb). Downscale it first."
        )


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4); got {array.shape}.")
    _check_size((array.shape[1], array.shape[0]), "the given array")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if np.nanmax(array) <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    else:
        raise ImageError(f"Unsupported image array dtype {array.dtype}: use uint8, uint16, bool or float.")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's convert("RGB") clips 16-bit values at 255; rescale to 8 bits instead.
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "F" and values.max() <= 1.0:
            top = 1.0
        else:
            top = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Transparent pixels are shown on white rather than on whatever colour they happen to store.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
