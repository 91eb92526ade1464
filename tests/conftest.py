import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Builds tiny original-layout checkpoints on demand, once per session, training each tokenizer once."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(name: str, family: str, **kwargs) -> Path:
        if name not in built:
            tokenizer = built.get(f"_tokenizer_{family}")
            built[name] = tiny_checkpoints.build(family, root / name, tokenizer_from=tokenizer, **kwargs)
            built.setdefault(f"_tokenizer_{family}", built[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def v1_path(checkpoints):
    """EVEv1 as released: sharded safetensors, no preprocessor config (derived from mm_vision_tower)."""
    return checkpoints("v1", "v1")


@pytest.fixture(scope="session")
def v2_path(checkpoints):
    """EVEv2 with a preprocessor config at a small resolution, to keep image prompts short."""
    return checkpoints("v2", "v2", preprocessor=tiny_checkpoints.v2_preprocessor(max_size=224))


@pytest.fixture(scope="session")
def v1_model(v1_path):
    from mlx_eve import load

    return load(str(v1_path))


@pytest.fixture(scope="session")
def v2_model(v2_path):
    from mlx_eve import load

    return load(str(v2_path))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """A few RGB test images of different shapes, saved as PNG."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size in {"wide": (320, 240), "tall": (150, 260), "square": (57, 57), "strip": (500, 100)}.items():
        image = Image.new("RGB", size, (240, 240, 240))
        draw = ImageDraw.Draw(image)
        w, h = size
        draw.ellipse((w * 0.2, h * 0.2, w * 0.6, h * 0.7), fill=(220, 30, 30))
        draw.rectangle((w * 0.55, h * 0.1, w * 0.9, h * 0.5), fill=(30, 60, 220))
        paths[name] = root / f"{name}.png"
        image.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def server(v2_path, tmp_path_factory, request):
    """``python -m mlx_eve.server`` on the tiny EVEv2 for one test module, with the module's ``SERVER_OPTIONS``."""
    from processes import start_server, stop_server

    options = getattr(request.module, "SERVER_OPTIONS", ())
    server = start_server(v2_path, tmp_path_factory.mktemp("server") / "server.log", *options)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server, request):
    """An ``openai`` client of ``server``, with the module's ``KEY`` if it has one."""
    openai = pytest.importorskip("openai")
    key = getattr(request.module, "KEY", "unused")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(v2_path):
    """The name the server gives the tiny EVEv2: its folder's."""
    return v2_path.name
