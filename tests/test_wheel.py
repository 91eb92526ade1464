"""A built wheel carries the demo model: installed into a fresh virtual environment, ``mlx_eve.generate``
answers about the packaged example image with no ``--model``, from outside the repository.

The wheel's dependencies are installed by pip from the index it is configured with (no cache shortcut), so
the test also checks that the declared dependencies are enough to run it.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from bundled_image import README_ANSWER, README_QUESTION

ROOT = Path(__file__).resolve().parent.parent


def cannot_build() -> str:
    """Why this environment cannot build the wheel offline (no build isolation), or ""."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return "cannot build a wheel offline: setuptools is not installed in this environment"
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) < (70, 1):  # older setuptools builds wheels only with the separate wheel package
        try:
            importlib.metadata.version("wheel")
        except importlib.metadata.PackageNotFoundError:
            return f"cannot build a wheel offline: setuptools {version} needs the wheel package"
    return ""


def run(*args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the fresh environment must find mlx_eve in its own site-packages, not in the repo.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if cannot_build():
        pytest.skip(cannot_build())
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the wheel is made of, so no build/ or stale build output in the repo leaks in.
    source = tmp / "source"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "mlx_eve", source / "mlx_eve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, source, cwd=tmp)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("mlx_eve-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and its dependencies installed."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    created = run(sys.executable, "-m", "venv", root, cwd=root.parent)
    assert created.returncode == 0, created.stderr
    # --no-compile: byte-compiling every dependency up front (transformers is large) takes longer than the
    # install itself on a small CPU; what is imported is compiled on import as usual.
    installed = run(root / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", wheel, cwd=root.parent)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """A working directory outside the repository, so its sources cannot be imported."""
    return tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def installed(venv, elsewhere) -> dict:
    """Where the fresh environment's mlx_eve, its demo assets and its site-packages are."""
    code = (
        "import sysconfig, mlx_eve, mlx_eve.demo as d; "
        "print(mlx_eve.__file__); print(d.BUNDLED_MODEL); print(d.EXAMPLE_IMAGES); "
        "print(sysconfig.get_paths()['purelib'])"
    )
    out = run(venv / "bin" / "python", "-c", code, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    package, model, images, site = (Path(line).resolve() for line in out.stdout.splitlines())
    return {"package": package, "model": model, "images": images, "site": site}


def test_wheel_lists_every_file_of_the_demo_model_and_images(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "mlx_eve" / "assets").rglob("*") if p.is_file())
    assert "mlx_eve/assets/eve-shapes/model.safetensors" in assets and "mlx_eve/assets/images/shapes.png" in assets
    assert [a for a in assets if a not in names] == []
    assert "mlx_eve/demo.py" in names


def test_mlx_eve_is_imported_from_the_fresh_venv_not_the_repo(installed, venv):
    assert installed["package"].is_relative_to(installed["site"]), installed
    assert installed["site"].is_relative_to(venv.resolve()), installed
    for path in installed.values():
        assert not path.is_relative_to(ROOT), installed
    assert (installed["model"] / "model.safetensors").is_file() and (installed["images"] / "shapes.png").is_file()


def test_installed_generate_answers_with_the_bundled_model(installed, venv, elsewhere):
    image = installed["images"] / "shapes.png"
    out = run(venv / "bin" / "python", "-m", "mlx_eve.generate", "--image", image, "-p", README_QUESTION, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("==========")[0].strip() == README_ANSWER, out.stdout


def test_console_script_is_installed(venv, elsewhere):
    script = venv / "bin" / "mlx_eve.generate"
    assert script.is_file() and os.access(script, os.X_OK)
    out = run(script, "--help", cwd=elsewhere)
    assert out.returncode == 0 and "--model" in out.stdout, out.stderr
