"""The chat app as a server process, ``python app.py``: its API endpoint driven by the real ``gradio_client``,
what it says it loaded, its one-line errors at start-up, and Ctrl-C while it is answering."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import tiny_checkpoints
from bundled_image import IMAGE, README_ANSWER, README_QUESTION
from processes import restore_ctrl_c
from zero_adapters import write_zero_adapters

from mlx_eve import generate, load, stream_generate
from mlx_eve.demo import BUNDLED_MODEL

pytest.importorskip("gradio", reason="the app needs gradio: pip install 'mlx-eve[app]'")
gradio_client = pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parent.parent


# --- The app as a process ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    process: subprocess.Popen
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def interrupt(self, times: int = 1, timeout: float = 60) -> float:
        """Ctrl-C, ``times`` times 50 ms apart, as a user quits: the seconds until the app exited with code 130,
        without a traceback and with its one-line message last."""
        start = time.monotonic()
        for i in range(times):
            if i:
                time.sleep(0.05)
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Unbuffered, with faulthandler: SIGABRT puts every thread's stack in the log.
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(timeout=30)
            pytest.fail(f"app.py did not quit within {timeout} s of Ctrl-C:\n{self.output()}")
        elapsed = time.monotonic() - start
        output = self.output()
        assert self.process.returncode == 130 and "Traceback" not in output, output
        assert output.rstrip().splitlines()[-1] == "interrupted", output
        return elapsed


@contextmanager
def running_app(tmp: Path, *args: str) -> Iterator[App]:
    """``python app.py --port N *args`` as the README starts it, once it serves its page; quit with Ctrl-C
    at the end (if it still runs), which must exit cleanly."""
    port = free_port()
    log = tmp / "app.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "uploads"), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(port), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=restore_ctrl_c,
        )
    app = App(process, f"http://127.0.0.1:{port}/", log)
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{app.output()}")
            try:
                with urllib.request.urlopen(app.url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not start serving:\n{app.output()}")
                time.sleep(0.3)
        yield app
        if process.poll() is None:
            app.interrupt()
    finally:
        if process.poll() is None:
            process.kill()


def client(app: App) -> "gradio_client.Client":
    return gradio_client.Client(app.url, verbose=False, analytics_enabled=False)


# --- The API endpoint ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return write_zero_adapters(BUNDLED_MODEL, tmp_path_factory.mktemp("adapters") / "zero-lora")


@pytest.fixture(scope="module")
def demo_model(adapters):
    return load(str(BUNDLED_MODEL), adapter_path=str(adapters))


@pytest.fixture(scope="module")
def api_app(tmp_path_factory, adapters) -> Iterator[App]:
    with running_app(tmp_path_factory.mktemp("api-app"), "--adapter-path", str(adapters)) as app:
        yield app


def test_an_image_question_is_answered_as_generate_answers_it(api_app, demo_model):
    model, processor = demo_model
    answer, stats = client(api_app).predict(
        question=README_QUESTION, image=gradio_client.handle_file(IMAGE), max_tokens=24, api_name="/answer"
    )
    # What generate() joins, greedy, in-process.
    expected = list(stream_generate(model, processor, README_QUESTION, image=IMAGE, max_tokens=24))
    assert answer == "".join(r.text for r in expected) and README_ANSWER in answer
    last = expected[-1]
    assert stats["image_tokens"] == last.image_tokens > 0 and stats["prompt_tokens"] == last.prompt_tokens
    assert stats["generation_tokens"] == last.generation_tokens and stats["finish_reason"] == last.finish_reason
    assert stats["generation_tps"] > 0 and stats["peak_memory"] > 0


def test_a_text_question_streams_its_answer(api_app, demo_model):
    question = "Hello! What can you help me with?"
    job = client(api_app).submit(question=question, max_tokens=40, api_name="/answer")
    answer, stats = job.result(timeout=120)
    assert answer == generate(*demo_model, question, max_tokens=40)
    assert stats["image_tokens"] == 0 and stats["finish_reason"] in ("stop", "length")
    partial = [text for text, _ in job.outputs()]
    assert partial[-1] == answer and all(answer.startswith(text) for text in partial)


def test_a_bad_image_is_a_clear_error_and_the_app_keeps_working(api_app, demo_model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    api = client(api_app)
    job = api.submit(question="What is it?", image=gradio_client.handle_file(broken), api_name="/answer")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"^Could not read image broken\.jpg: "):
        job.result(timeout=60)
    with pytest.raises(gradio_client.exceptions.AppError, match="Ask a question"):
        api.predict(question=" ", api_name="/answer")
    answer, _ = api.predict(question=README_QUESTION, image=gradio_client.handle_file(IMAGE), api_name="/answer")
    assert answer == generate(*demo_model, README_QUESTION, image=IMAGE)


def test_the_answer_endpoint_is_the_only_one_listed(api_app):
    listing = client(api_app).view_api(print_info=False, return_format="dict")
    assert set(listing["named_endpoints"]) == {"/answer"} and not listing["unnamed_endpoints"]
    parameters = {p["parameter_name"]: p for p in listing["named_endpoints"]["/answer"]["parameters"]}
    assert list(parameters) == [
        "question",
        "temperature",
        "top_p",
        "max_tokens",
        "repetition_penalty",
        "system_prompt",
        "max_size",
        "image",
    ]
    assert parameters["image"]["parameter_has_default"] and parameters["max_tokens"]["parameter_default"] == 256


def test_the_page_and_the_terminal_say_what_is_loaded(api_app):
    header = next(c for c in client(api_app).config["components"] if c["props"].get("elem_id") == "header")
    assert "Model: `eve-shapes` (EVEv2) with adapters `zero-lora`" in header["props"]["value"]
    output = api_app.output()
    assert "Loaded eve-shapes (EVEv2) with adapters zero-lora in " in output
    assert f"Running on {api_app.url} (Ctrl-C to quit)" in output
    # Gradio's hint to set `share=True` in `launch()`: meant for its Python API, not for the app's user.
    assert "share=True" not in output


# --- Ctrl-C ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rambling_model(checkpoints) -> Path:
    """A random model slow enough (about 150 tokens/s here) that 4096 tokens take half a minute; it rambles on."""
    return checkpoints(
        "v2-rambling",
        "v2",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        preprocessor=tiny_checkpoints.v2_preprocessor(224),
    )


@pytest.mark.parametrize("times", [1, 2])
def test_ctrl_c_while_answering_stops_the_answer_and_exits(rambling_model, tmp_path, times):
    with running_app(tmp_path, "--model", str(rambling_model)) as app:
        job = client(app).submit(question="Tell me a long story.", max_tokens=4096, api_name="/answer")
        deadline = time.monotonic() + 60
        while len(job.outputs()) < 3:
            assert not job.done() and time.monotonic() < deadline, app.output()
            time.sleep(0.05)
        # A second Ctrl-C comes while the app shuts down: the same exit, without a traceback.
        # About 1.5 s here; the answer alone would hold it for half a minute, and a stopped Gradio queue for 5 s.
        assert app.interrupt(times) < 5


# --- Start-up errors and options -----------------------------------------------------------------------------


def run_app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app("--port", str(port))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == (
        f"error: Could not serve on 127.0.0.1: port {port} is in use, or 127.0.0.1 is not an address of this "
        "computer. Choose another --port (or --host).\n"
    )


@pytest.mark.parametrize("broken", ["model", "adapters"])
def test_a_model_that_does_not_load_is_one_line(tmp_path, broken):
    (tmp_path / "folder").mkdir()
    if broken == "model":
        result, expected = run_app("--model", str(tmp_path / "folder")), "has no config.json"
    else:
        (tmp_path / "folder" / "adapter_config.json").write_text("{")
        result, expected = run_app("--adapter-path", str(tmp_path / "folder")), "No adapters.safetensors"
    assert result.returncode == 1 and result.stderr.startswith("error: ") and expected in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "0"], "argument --port: expected a port number (1-65535), got '0'"),
        (["--port", "70000"], "argument --port: expected a port number (1-65535), got '70000'"),
        (["--max-size", "-1"], "argument --max-size: expected an integer >= 1, got '-1'"),
    ],
)
def test_bad_options_are_refused_when_parsed(args, message, capsys):
    from mlx_eve.commands.app import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(args)
    assert exit.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_help_tells_the_defaults_and_what_share_does(capsys):
    from mlx_eve.commands.app import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert "--max-size MAX_SIZE Default EVEv2 image resolution (default: the model's)." in help
    assert "--share Also serve the app on a public gradio.live link, through Gradio's share servers" in help
