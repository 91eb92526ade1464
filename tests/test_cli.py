"""The generate CLI, run as a user runs it: a separate process, output and exit code checked."""

import os
import re
import subprocess
import sys
from pathlib import Path

import tiny_checkpoints

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_generate_streams_and_reports_stats(v2_path, images):
    result = run(
        "generate.py",
        "--model",
        str(v2_path),
        "--image",
        str(images["wide"]),
        "-p",
        "What is it?\\nBe brief.",
        "-m",
        "5",
        "--verbose",
    )
    assert result.returncode == 0, result.stderr
    assert "USER: <image>\nWhat is it?\nBe brief. ASSISTANT:" in result.stdout  # "\n" escape → newline
    tokens = re.search(r"Prompt: (\d+) tokens \((\d+) image tokens\), [\d.]+ tokens-per-sec", result.stdout)
    assert tokens and int(tokens[2]) == 1 + 7 * 10  # 320x240 at max_size 224 → 320x224 → 10x7 cells
    assert re.search(r"Generation: 5 tokens, [\d.]+ tokens-per-sec", result.stdout)
    assert re.search(r"Peak memory: [\d.]+ GB", result.stdout)


def test_module_entry_point_text_only_from_stdin(v1_path):
    result = run(
        "-m",
        "mlx_eve.generate",
        "--model",
        str(v1_path),
        "-p",
        "-",
        "-m",
        "3",
        "--temperature",
        "0.7",
        "--seed",
        "1",
        stdin="Hello?\nSay hi.",
    )
    assert result.returncode == 0, result.stderr
    assert "(0 image tokens)" in result.stdout and "Generation: 3 tokens" in result.stdout


def test_bad_image_is_a_clear_error(v2_path, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run("generate.py", "--model", str(v2_path), "--image", str(tmp_path / "broken.jpg"), "-p", "Hi")
    assert result.returncode == 1
    assert result.stderr.startswith("error: Could not read image") and "Traceback" not in result.stderr


def test_prompt_over_the_context_is_a_clear_error(checkpoints, images):
    path = checkpoints(
        "v2-short-context", "v2", max_position_embeddings=128, preprocessor=tiny_checkpoints.v2_preprocessor(224)
    )
    result = run("generate.py", "--model", str(path), "--image", str(images["wide"]), "-p", "Hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "model's context is 128 tokens" in result.stderr and "--max-size" in result.stderr
    assert (
        run(
            "generate.py", "--model", str(path), "--image", str(images["wide"]), "-p", "Hi", "--max-size", "64"
        ).returncode
        == 0
    )


def test_unreachable_hub_is_a_clear_error(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0"}
    result = run("generate.py", "--model", "nobody/no-such-eve", "-p", "Hi", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Hugging Face Hub could not provide it" in result.stderr


COMMANDS = ["generate", "convert", "lora", "fuse", "app", "server", "caption", "evaluate"]
COMMANDS += ["awq", "gptq", "dwq", "dynamic_quant"]


def test_help_and_argument_errors_need_no_mlx_lm():
    """Parsing runs before mlx-lm (and transformers), Gradio, FastAPI or tqdm are loaded: seconds to import."""
    code = (
        "import importlib, sys\n"
        "command = importlib.import_module('mlx_eve.{name}')\n"
        "for argv in (['--help'], ['--no-such-option']):\n"
        "    try:\n"
        "        command.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, 2), e.code\n"
        "heavy = ('mlx_lm', 'transformers', 'torch', 'gradio', 'fastapi', 'tqdm')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    for name in COMMANDS:
        result = run("-c", code.format(name=name))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "[]", (name, result.stdout[-500:])


def test_the_recipe_names_the_parser_knows_are_mlx_lms():
    from mlx_lm.convert import QUANT_RECIPES

    from mlx_eve.arguments import QUANT_RECIPES as ours

    assert ours == QUANT_RECIPES
