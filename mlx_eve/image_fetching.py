"""Images named in a request: ``data:`` URIs, http(s) URLs and (when allowed) local files, each within limits.

``download`` is the one downloader: the server's image URLs and those given to ``load_image`` go through it. A
server's downloads reach public addresses only (unless ``allow_local_images``), redirects included, and every failed
one is the same message to the client (why it failed goes to the log): a request can neither reach the server's own
network nor map it.
"""

import base64
import binascii
import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Union

from .errors import ImageError, shorten

URL_SCHEMES = ("http://", "https://")
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    """Where a request's images may come from, and how big and slow they may be."""

    allow_local_images: bool = False  # local files, and URLs of loopback, private and link-local addresses
    allow_image_urls: bool = True  # http(s) downloads at all
    max_image_bytes: int = 20 * 2**20
    image_timeout: float = 30.0


class _DownloadFailed(Exception):
    """Why a download failed, for the log only."""


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
    if url.startswith(URL_SCHEMES):
        if not limits.allow_image_urls:
            raise ImageError(
                "This server does not download image URLs: send the image inline as a data: URI "
                "(data:image/png;base64,...)."
            )
        return download(url, limits.max_image_bytes, limits.image_timeout, allow_private=limits.allow_local_images)
    if not limits.allow_local_images:
        raise ImageError(
            f"Image {shorten(url)}: give an http(s) URL or a data: URI (this server reads local files only when "
            "started with --allow-local-images)."
        )
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path) if url.startswith("file:") else url)
    if path.is_file() and path.stat().st_size > limits.max_image_bytes:
        raise ImageError(f"Image {path} is larger than {limits.max_image_bytes:,} bytes.")
    return path


def download(url: str, max_bytes: int, timeout: float, *, allow_private: bool = True) -> bytes:
    """At most ``max_bytes`` from ``url``, following at most ``MAX_REDIRECTS`` redirects, within ``timeout`` seconds
    in all, or ``ImageError``: the same one whatever went wrong (the log says what).

    Without ``allow_private`` every host, a redirect's too, must resolve to public addresses only (``is_public``),
    checked before connecting to one of them."""
    deadline = time.monotonic() + timeout
    try:
        return _download(url, max_bytes, deadline, allow_private)
    except (_DownloadFailed, OSError, http.client.HTTPException, ValueError) as error:
        reason = f"it took longer than {timeout:g} s" if time.monotonic() >= deadline else error
        logger.info("Could not download image %s: %s", shorten(url), reason)
        raise ImageError(f"Could not download image {shorten(url)}.") from error


def is_public(address: str) -> bool:
    """Whether the IP ``address`` is on the public internet: not loopback, private, link-local (as the
    169.254.169.254 of cloud metadata services), multicast, reserved or unspecified, nor an IPv6 form of such an
    IPv4 address."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 address may end with its interface: %eth0
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _download(url: str, max_bytes: int, deadline: float, allow_private: bool) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _DownloadFailed(f"{shorten(url)} is not an http(s) URL")
        with _connection(parts, deadline, allow_private) as connection:
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", path, headers={"User-Agent": "mlx-eve"})
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise _DownloadFailed(f"HTTP {response.status} {response.reason}")
            return _body(response, max_bytes, deadline)
    raise _DownloadFailed(f"more than {MAX_REDIRECTS} redirects")


@contextmanager
def _connection(
    parts: urllib.parse.SplitResult, deadline: float, allow_private: bool
) -> Iterator[http.client.HTTPConnection]:
    """An HTTP(S) connection to the host of ``parts`` at an address checked, not looked up again (a second answer
    could differ), and shut at ``deadline`` whatever it then waits for (the TLS handshake, headers or body)."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    sock = _connect(_checked_addresses(parts.hostname, port, allow_private), port, deadline)
    watched = sock.dup()  # the same connection, still ours to shut once TLS has taken ``sock`` over
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, port)
    connection._create_connection = lambda *args: sock  # http.client's hook for its socket: ours, connected
    timer = threading.Timer(deadline - time.monotonic(), _shut, (watched,))
    timer.start()
    try:
        connection.connect()
        yield connection
    finally:
        timer.cancel()
        timer.join()
        connection.close()
        sock.close()
        watched.close()


def _checked_addresses(host: str, port: int, allow_private: bool) -> List[str]:
    """The addresses ``host`` resolves to, each of them public unless ``allow_private``."""
    addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise _DownloadFailed(f"{host} is at {address}, which is not a public address")
    return addresses


def _connect(addresses: List[str], port: int, deadline: float) -> socket.socket:
    """A socket connected to the first of ``addresses`` that answers before ``deadline``."""
    for address in addresses[:-1]:
        try:
            return socket.create_connection((address, port), _left(deadline))
        except OSError:
            continue
    return socket.create_connection((addresses[-1], port), _left(deadline))


def _body(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    if int(response.getheader("Content-Length") or 0) > max_bytes:
        raise _DownloadFailed(f"it is larger than {max_bytes:,} bytes (Content-Length)")
    data = bytearray()
    while chunk := response.read1(1 << 16):
        data += chunk
        if len(data) > max_bytes:
            raise _DownloadFailed(f"it is larger than {max_bytes:,} bytes")
    if time.monotonic() >= deadline:  # the connection was shut: what came is not the whole image
        raise _DownloadFailed("the deadline passed")
    return bytes(data)


def _left(deadline: float) -> float:
    """The seconds left before ``deadline``; ``TimeoutError`` if none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no time is left")
    return left


def _shut(sock: socket.socket) -> None:
    """Ends ``sock``'s connection, waking whatever read waits on it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # the connection has just ended of itself
        pass
