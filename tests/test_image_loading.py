"""Every way a user can hand over an image, and every way it can be bad."""

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from mlx_eve.errors import ImageError
from mlx_eve.image import MAX_PIXELS, load_image


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_path_pil_bytes_and_array_agree(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    image.save(tmp_path / "a.png")
    for source in (str(tmp_path / "a.png"), tmp_path / "a.png", image, _png_bytes(image), array):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(loaded), array)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top_middle = np.asarray(upright)[2, 10]
    assert top_middle[2] > 200 and top_middle[0] < 60  # the blue strip is now on top


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (255, 0, 0, 255)  # opaque red top half, fully transparent (black) bottom half
    loaded = np.asarray(load_image(Image.fromarray(rgba)))
    assert tuple(loaded[0, 0]) == (255, 0, 0)
    assert tuple(loaded[3, 3]) == (255, 255, 255)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])  # transparent black, opaque black
    assert np.asarray(load_image(la)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_cmyk_grayscale_and_16_bit():
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert tuple(np.asarray(load_image(palette))[0, 0]) == (10, 200, 30)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(np.asarray(load_image(cmyk))[0, 0]) == (255, 0, 0)
    gray = Image.new("L", (2, 2), 77)
    assert tuple(np.asarray(load_image(gray))[1, 1]) == (77, 77, 77)
    sixteen = Image.fromarray(np.full((2, 2), 65535 // 2, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert tuple(np.asarray(load_image(sixteen))[0, 0]) == (127, 127, 127)  # not clipped to white
    assert tuple(np.asarray(load_image(np.full((2, 2), 0.5, dtype=np.float32)))[0, 0]) == (128, 128, 128)


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("this is not an image")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(tmp_path / "text.png")
    data = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_empty_and_oversized_images(tmp_path):
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 3)))
    # A decompression bomb: a tiny PNG file that claims 20000 x 10000 pixels.
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000 and 20000 * 10000 > MAX_PIXELS
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")


def test_bad_arrays_and_types():
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.zeros((8, 8, 3), dtype=np.int64))
    with pytest.raises(ImageError, match="Unsupported image type"):
        load_image(42)


@pytest.fixture
def http_server(tmp_path):
    (tmp_path / "img.png").write_bytes(_png_bytes(Image.new("RGB", (7, 5), (1, 2, 3))))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls(http_server):
    image = load_image(f"{http_server}/img.png")
    assert image.size == (7, 5) and tuple(np.asarray(image)[0, 0]) == (1, 2, 3)
    with pytest.raises(ImageError, match="Could not download"):
        load_image(f"{http_server}/missing.png")
