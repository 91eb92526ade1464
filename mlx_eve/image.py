"""Turn whatever the user passes as an image into an upright RGB PIL image, or fail with a clear message.

``open_image`` reads only an image's header (its size and orientation); ``OpenedImage.decode`` reads its pixels. So
the image tokens of a request can be counted before any image is decoded.
"""

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import ImageError
from .image_fetching import download

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
TargetSize = Callable[[int, int], Tuple[int, int]]  # an image processor's (width, height) → resized (width, height)

# Pillow's own hard limit (twice Image.MAX_IMAGE_PIXELS): beyond it an image is treated as a decompression bomb.
MAX_PIXELS = 178_956_970
MAX_DOWNLOAD_BYTES = 200 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30
# Larger images are reduced before their conversion to RGB, to spare memory; smaller ones keep the reference's pixels.
REDUCE_ABOVE_PIXELS = 64_000_000
# Modes whose pixels Image.reduce averages as they are; the others are converted to RGB first, a band at a time.
AVERAGED_MODES = ("L", "LA", "RGB", "RGBA")
BAND_PIXELS = 1 << 22
# The transpose that makes each EXIF orientation upright, as in ImageOps.exif_transpose.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
QUARTER_TURNS = (5, 6, 7, 8)  # the orientations that swap width and height


class OpenedImage:
    """An image whose upright ``size`` is known from its header; ``decode`` reads its pixels."""

    def __init__(self, image: Image.Image, name: str, callers: bool):
        self.name = name
        self._image = image
        self._callers = callers  # the caller's own object: neither changed nor handed back as it is
        self._orientation = _orientation(image, name)
        width, height = image.size
        self.size = (height, width) if self._orientation in QUARTER_TURNS else (width, height)

    def decode(self, target_size: Optional[TargetSize] = None) -> Image.Image:
        """The upright RGB image; once only, as the pixels are not kept here. Given the image processor's
        ``target_size``, an image of more than ``REDUCE_ABOVE_PIXELS`` is first reduced by the largest integer factor
        that leaves it at least twice its target size, and with the same target size (so the same image tokens)."""
        image, self._image = self._image, None
        given = image if self._callers else None
        large = target_size is not None and self.size[0] * self.size[1] > REDUCE_ABOVE_PIXELS
        factor = _reduction(self.size, target_size) if large else 1
        if factor > 1 and not self._callers:
            factor = _draft(image, factor)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"Could not read image {self.name}: the file is corrupt or truncated ({e}).") from e
        try:
            if factor > 1:
                image = _reduce(image, factor)
            if self._orientation in UPRIGHT:
                image = image.transpose(UPRIGHT[self._orientation])
            image = _to_rgb(image)
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"Could not read image {self.name}: {e}") from e
        return image.copy() if image is given else image


def open_image(source: ImageInput) -> OpenedImage:
    """Path, URL, raw bytes, PIL image or numpy array → ``OpenedImage``, its pixels not decoded yet."""
    if isinstance(source, Image.Image):
        image, name = source, "the given image"
    elif isinstance(source, np.ndarray):
        image, name = _from_array(source), "the given array"
    elif isinstance(source, bytes):
        image, name = _open(source, "the given bytes"), "the given bytes"
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        if name.startswith(("http://", "https://")):
            image = _open(download(name, MAX_DOWNLOAD_BYTES, DOWNLOAD_TIMEOUT_S), name)
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
    return OpenedImage(image, name, callers=image is source)


def load_image(source: ImageInput) -> Image.Image:
    """Path, URL, raw bytes, PIL image or numpy array → RGB PIL image with its EXIF orientation applied."""
    return open_image(source).decode()


def _open(source: Union[bytes, Path], name: str) -> Image.Image:
    """The image's header only: its pixels are read when it is loaded. A file is read at once, so that none is left
    open, nor can change, between its header and its pixels."""
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
        with warnings.catch_warnings():
            # Our own size check gives the clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f"Image {name} is too large to decode safely ({e}).") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"Could not read image {name}: not a recognised image file.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Could not read image {name}: the file is corrupt or truncated ({e}).") from e


def _orientation(image: Image.Image, name: str) -> int:
    try:
        # PngImageFile.getexif decodes the whole image when the EXIF is not in its header: the base method reads
        # only what the header gave (so the orientation used is always the one the size was counted with).
        return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Could not read image {name}: {e}") from e


def _reduction(size: Tuple[int, int], target_size: TargetSize) -> int:
    """The largest integer factor that leaves an image of ``size`` at least twice its target size along each side,
    and with the same target size; 1 if none does."""
    width, height = size
    target = target_size(width, height)
    most = min(width // (2 * target[0]), height // (2 * target[1]))
    # Multiples of 8 first, then of 4 and 2: a JPEG decodes straight at 1/8, 1/4 or 1/2 of its size.
    factors = sorted(range(most, 1, -1), key=lambda f: min(f & -f, 8), reverse=True)
    return next((f for f in factors if target_size(-(-width // f), -(-height // f)) == target), 1)


def _draft(image: Image.Image, factor: int) -> int:
    """Has a JPEG decode straight at 1/2, 1/4 or 1/8 of its size (the largest that divides ``factor``); returns the
    factor left to reduce by. Other formats are not changed."""
    scale = min(factor & -factor, 8)
    width, height = image.size
    if scale > 1 and image.draft(image.mode, (width // scale, height // scale)) is not None:
        return factor // scale
    return factor


def _reduce(image: Image.Image, factor: int) -> Image.Image:
    """``image`` reduced ``factor`` times, in RGB unless its mode is one ``Image.reduce`` can average."""
    if image.mode in AVERAGED_MODES:
        return image.reduce(factor)
    width, height = image.size
    # How "I" and "F" images become 8 bits depends on their whole range: those are converted in one piece.
    rows = height if image.mode in ("I", "F") else factor * max(1, BAND_PIXELS // (width * factor))
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        reduced.paste(_to_rgb(image.crop((0, top, width, min(top + rows, height)))).reduce(factor), (0, top // factor))
    return reduced


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
