"""Images named in a request: ``data:`` URIs, http(s) URLs and (when allowed) local files, each within limits.

``download`` is the one downloader: the server's image URLs and those given to ``load_image`` go through it.
"""

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .errors import ImageError, shorten


@dataclass(frozen=True)
class ImageLimits:
    """Where a request's images may come from, and how big and slow they may be."""

    allow_local_images: bool = False  # local files, and URLs of loopback, private and link-local addresses
    allow_image_urls: bool = True  # http(s) downloads at all
    max_image_bytes: int = 20 * 2**20
    image_timeout: float = 30.0


def read_image(url: str, limits: ImageLimits) -> Union[bytes, Path]:
    """An image URL's content: a ``data:`` URI's bytes, an http(s) download, or (with ``allow_local_images``) a
    local path or ``file://`` URL. The image itself is decoded (and checked) by the engine."""
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageError("An image data URI must be base64-encoded: data:image/png;base64,...")
        if len(data) // 4 * 3 > limits.max_image_bytes:
            raise ImageError(f"The image data URI holds more than {limits.max_image_bytes:,} bytes.")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ImageError(f"The image data URI is not valid base64 ({e}).") from e
    if url.startswith(("http://", "https://")):
        return download(url, limits.max_image_bytes, limits.image_timeout)
    if not limits.allow_local_images:
        raise ImageError(
            f"Image {shorten(url)}: give an http(s) URL or a data: URI (this server reads local files only when "
            "started with --allow-local-images)."
        )
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path) if url.startswith("file:") else url)
    if path.is_file() and path.stat().st_size > limits.max_image_bytes:
        raise ImageError(f"Image {path} is larger than {limits.max_image_bytes:,} bytes.")
    return path


def download(url: str, max_bytes: int, timeout: float) -> bytes:
    """At most ``max_bytes`` from ``url`` within about ``timeout`` seconds, or ``ImageError``."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mlx-eve"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageError(f"Image {shorten(url)} is larger than {max_bytes:,} bytes.")
                if time.monotonic() > deadline:
                    raise ImageError(f"Image {shorten(url)} took longer than {timeout:g} s to download.")
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"Could not download image {shorten(url)}: HTTP {e.code} {e.reason}.") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"Could not download image {shorten(url)}: {getattr(e, 'reason', e)}") from e
    return bytes(data)
