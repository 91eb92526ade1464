"""Image URLs downloaded as a server must: public addresses only (redirects included), the same error whatever
failed, within the timeout however slowly the other end sends, and never in the way of requests with inline images.
Every server here is this test's own, on loopback."""

import base64
import io
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mlx_eve import image_fetching
from mlx_eve.errors import ImageError
from mlx_eve.image_fetching import MAX_REDIRECTS, ImageLimits, download, is_public, read_image

SERVER = ImageLimits()  # a server's defaults
LOCAL = ImageLimits(allow_local_images=True)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    """``/img.png``; ``/hops/N``: N redirects before it; ``/to?URL``: a redirect to URL; ``/loop``: to itself;
    ``/large``: a body over 1,000 bytes; ``/drip-body``, ``/drip-headers``: a byte every 0.5 s; else 404."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path == "/img.png":
            self.send(200, PNG)
        elif self.path.startswith("/hops/"):
            hops = int(self.path.rpartition("/")[2])
            self.redirect(f"/hops/{hops - 1}" if hops > 1 else "/img.png")
        elif self.path.startswith("/to?"):
            self.redirect(self.path.partition("?")[2])
        elif self.path == "/loop":
            self.redirect("/loop")
        elif self.path == "/large":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"\0" * 1001)  # no Content-Length: to the end
        elif self.path.startswith("/drip-"):
            self.drip(self.path == "/drip-headers")
        else:
            self.send(404, b"")

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.end_headers()

    def drip(self, in_headers: bool) -> None:
        """A byte every 0.5 s (of a header or of the body) until the server is ``released``."""
        self.wfile.write(b"HTTP/1.0 200 OK\r\n" + (b"X-Slow: " if in_headers else b"Content-Length: 9999\r\n\r\n"))
        try:
            while not self.server.released.wait(0.5):
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:  # the downloader has given up
            pass

    def log_message(self, *args):
        pass


class Host(ThreadingHTTPServer):
    """A test server that counts the connections it accepts and keeps the paths asked for."""

    request_queue_size = 64

    def __init__(self, address: str = "127.0.0.1"):
        super().__init__((address, 0), Handler)
        self.connections, self.paths, self.released = 0, [], threading.Event()
        self.url = f"http://{address}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def verify_request(self, request, client_address):
        self.connections += 1
        return True

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def host():
    server = Host()
    yield server
    server.stop()


def fails(url: str, limits: ImageLimits = SERVER) -> str:
    """The message of the ``ImageError`` that reading ``url`` with ``limits`` raises."""
    with pytest.raises(ImageError) as error:
        read_image(url, limits)
    return str(error.value)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("127.255.0.9", False),
        ("::1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # cloud metadata
        ("fe80::1%lo", False),
        ("fc00::1", False),
        ("224.0.0.1", False),
        ("ff0e::1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("::127.0.0.1", False),  # IPv4-compatible (reserved)
    ],
)
def test_public_addresses(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize(
    "url",
    [
        "{host}/img.png",
        "http://localhost:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://[::1]:{port}/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/img.png",
        "https://192.168.0.1/img.png",
    ],
)
def test_a_non_public_address_is_refused_before_connecting(host, url):
    url = url.format(host=host.url, port=host.server_address[1])
    start = time.monotonic()
    assert fails(url) == f"Could not download image {url}."
    assert time.monotonic() - start < 1 and host.connections == 0
    assert read_image(f"{host.url}/img.png", LOCAL) == PNG and host.connections == 1  # what it would have seen


def test_every_failure_is_the_same_message_and_the_log_says_why(host, caplog):
    url = f"{host.url}/missing.png"
    caplog.set_level(logging.INFO, logger=image_fetching.__name__)
    refused = fails(url)
    assert "is at 127.0.0.1, which is not a public address" in caplog.text and host.connections == 0
    not_found = fails(url, LOCAL)
    assert "HTTP 404" in caplog.text and host.connections == 1
    host.stop()
    connection_refused = fails(url, LOCAL)
    assert "Connection refused" in caplog.text
    assert refused == not_found == connection_refused == f"Could not download image {url}."
    assert (
        fails("http://no-such-host.invalid/missing.png")
        == "Could not download image http://no-such-host.invalid/missing.png."
    )


def test_a_long_url_is_shortened_in_the_message(host):
    url = f"{host.url}/{'x' * 200}.png"
    message = fails(url, LOCAL)
    assert (
        message.startswith(f"Could not download image {host.url}/xxx") and message.endswith("….") and len(message) < 110
    )


def test_a_local_image_downloads_when_allowed(host):
    assert read_image(f"{host.url}/img.png", LOCAL) == PNG
    assert download(f"{host.url}/img.png", 10_000, 5) == PNG  # the Python API's (load_image's) own URLs
    assert host.paths == ["/img.png", "/img.png"]


def test_redirects_are_followed_up_to_the_limit(host):
    assert read_image(f"{host.url}/hops/{MAX_REDIRECTS}", LOCAL) == PNG
    assert fails(f"{host.url}/hops/{MAX_REDIRECTS + 1}", LOCAL).startswith("Could not download image")
    host.paths.clear()
    fails(f"{host.url}/loop", LOCAL)
    assert host.paths == ["/loop"] * (MAX_REDIRECTS + 1)


def test_a_redirect_to_another_scheme_is_refused(host):
    assert fails(f"{host.url}/to?file:///etc/hostname", LOCAL).startswith("Could not download image")


@pytest.mark.parametrize("target", ["private", "http://169.254.169.254/latest/meta-data/"])
def test_a_redirect_to_a_non_public_address_is_refused_before_connecting(host, monkeypatch, target):
    private = Host("127.0.0.2")  # loopback too, but taken here for a private network's address
    try:
        target = f"{private.url}/img.png" if target == "private" else target
        assert read_image(f"{host.url}/to?{private.url}/img.png", LOCAL) == PNG and private.connections == 1
        monkeypatch.setattr(image_fetching, "is_public", lambda address: address == "127.0.0.1")
        private.connections = 0
        assert fails(f"{host.url}/to?{target}") == f"Could not download image {host.url}/to?{target}."
        assert host.paths[-1] == f"/to?{target}" and private.connections == 0
    finally:
        private.stop()


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_the_timeout_bounds_the_whole_download(host, path, caplog):
    caplog.set_level(logging.INFO, logger=image_fetching.__name__)
    start = time.monotonic()
    assert fails(f"{host.url}{path}", ImageLimits(allow_local_images=True, image_timeout=2)).startswith("Could not")
    assert 2 <= time.monotonic() - start < 3 and "took longer than 2 s" in caplog.text


@pytest.mark.parametrize("path", ["/img.png", "/large"])  # too large by its Content-Length, or as it comes
def test_a_download_over_the_size_limit_fails(host, path):
    limits = ImageLimits(allow_local_images=True, max_image_bytes=len(PNG) - 1 if path == "/img.png" else 1000)
    assert fails(f"{host.url}{path}", limits) == f"Could not download image {host.url}{path}."


def test_image_urls_can_be_refused_altogether(host):
    message = fails(f"{host.url}/img.png", ImageLimits(allow_local_images=True, allow_image_urls=False))
    assert "does not download image URLs" in message and "data: URI" in message and host.connections == 0


def test_slow_downloads_do_not_hold_up_a_request_with_an_inline_image(host, v2_model):
    """Fifty requests whose image drips, the worker threads of the server's thread pool all busy if they ran there;
    then a request with a data: URI, which must not wait for them."""
    from starlette.testclient import TestClient

    from mlx_eve.api.app import create_app
    from mlx_eve.api.serving import ServerSettings
    from mlx_eve.engine import Engine

    def ask(url: str):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
        return http.post("/v1/chat/completions", json=body)

    model, processor = v2_model
    engine = Engine(model, processor, prompt_cache_bytes=0)
    settings = ServerSettings(model_id="tiny", allow_local_images=True, image_timeout=20)
    try:
        with TestClient(create_app(engine, processor, settings)) as http:
            slow = [threading.Thread(target=ask, args=(f"{host.url}/drip-body",)) for _ in range(50)]
            for thread in slow:
                thread.start()
            deadline = time.monotonic() + 10
            while host.connections < 8 and time.monotonic() < deadline:  # as many downloads as run at once
                time.sleep(0.05)
            start = time.monotonic()
            response = ask("data:image/png;base64," + base64.b64encode(PNG).decode())
            waited = time.monotonic() - start
            host.released.set()  # the downloads end (the drip stops short: they fail)
            for thread in slow:
                thread.join(timeout=20)
    finally:
        engine.close()
    assert host.connections >= 8 and response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2 and waited < 5
    assert not any(thread.is_alive() for thread in slow)


def test_the_downloads_connect_to_the_address_checked(host, monkeypatch):
    """A host looked up once: a second answer (DNS rebinding) is never asked for."""
    lookups = []
    real = socket.getaddrinfo

    def getaddrinfo(name, *args, **kwargs):
        lookups.append(name)
        return real("127.0.0.1" if name == "images.example" else name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = f"http://images.example:{host.server_address[1]}/img.png"
    assert read_image(url, LOCAL) == PNG
    assert lookups.count("images.example") == 1 and host.connections == 1
