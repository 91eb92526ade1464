"""On a Linux CPU: the one-time OpenBLAS hint, read from the libraries the process has mapped."""

import io
import sys

import mlx.core as mx
import pytest

from mlx_eve import cpu

MLX_BLAS = "/venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
NUMPY_BLAS = "/venv/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so"


def maps_file(tmp_path, *libraries):
    file = tmp_path / "maps"
    file.write_text(
        "".join(f"7f00-7f01 r-xp 00000000 08:01 42 {path}\n" for path in libraries) + "7f02-7f03 rw-p [heap]\n"
    )
    return file


@pytest.mark.skipif(not sys.platform.startswith("linux") or mx.default_device() != mx.cpu, reason="Linux CPU only")
@pytest.mark.parametrize(
    "libraries,hinted",
    [
        ((MLX_BLAS, NUMPY_BLAS), True),  # numpy's own OpenBLAS does not count
        ((MLX_BLAS, NUMPY_BLAS, "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"), False),  # preloaded
        ((MLX_BLAS, "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"), False),  # the system's BLAS
    ],
)
def test_the_openblas_hint_is_printed_once_and_only_when_needed(tmp_path, monkeypatch, libraries, hinted):
    monkeypatch.setattr(cpu, "_hinted", False)
    maps = maps_file(tmp_path, *libraries)
    terminal = Terminal()
    cpu.hint_openblas(maps, terminal)
    cpu.hint_openblas(maps, terminal)
    assert terminal.getvalue().count("LD_PRELOAD=") == (1 if hinted else 0)
    assert terminal.getvalue().count("\n") == (1 if hinted else 0)


def test_no_hint_when_nobody_reads_it_at_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "_hinted", False)
    log = io.StringIO()  # a pipe or a file
    cpu.hint_openblas(maps_file(tmp_path, MLX_BLAS), log)
    assert log.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
