"""Tensor parallelism: two processes (``mlx.launch --backend ring`` on this machine) answer as one does.

Run as a script, this file is the worker every process runs: ``python tests/test_distributed.py OUT IMAGE MODEL...``
answers a two-turn conversation about IMAGE with each model, greedily, and writes each rank's tokens and
log-probabilities to ``OUT/<processes>-<rank>.json``.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_checkpoints
from processes import LAUNCHER, ROOT, command

QUESTIONS = ["<image>\nWhat is in the image?", "Where is the blue square?"]
MAX_TOKENS = 8


def worker(out: Path, image: str, models: list) -> None:
    import mlx.core as mx

    from mlx_eve import load, stream_generate

    group = mx.distributed.init()
    results = {}
    for path in models:
        model, processor = load(path, group=group)
        layer_types = sorted(
            {type(m).__name__ for name, m in model.layers[0].named_modules() if name.endswith("_proj")}
        )
        conversation, turns = [], []
        for question in QUESTIONS:
            conversation.append({"role": "user", "content": question})
            responses = list(stream_generate(model, processor, conversation, image, max_tokens=MAX_TOKENS))
            text = "".join(r.text for r in responses)
            conversation.append({"role": "assistant", "content": text})
            turns.append(
                {
                    "text": text,
                    "tokens": [r.token for r in responses],
                    "logprobs": [r.logprobs.tolist() for r in responses],
                }
            )
        results[path] = {"layers": layer_types, "turns": turns}
    (out / f"{group.size()}-{group.rank()}.json").write_text(json.dumps(results))


def launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(processes, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def models(checkpoints, v1_path, tmp_path_factory):
    """Both families, in floating point and converted to 4-bit; EVEv2 also in bfloat16 and EVEv1 as ``.bin``
    (read whole, then split). Every head count divides by 2: EVEv2 with 2 key/value heads, since mlx-lm (and
    so ``shard``) splits heads and does not replicate them."""
    from test_finetune import write_dataset

    from mlx_eve.commands.learned_quant import gptq_main
    from mlx_eve.conversion import convert

    v2_preprocessor = tiny_checkpoints.v2_preprocessor(224)
    v2 = checkpoints("v2-kv2", "v2", preprocessor=v2_preprocessor, num_key_value_heads=2)
    root = tmp_path_factory.mktemp("distributed")
    # Group size 32: each rank's half of an o_proj input (64 wide here) must hold whole quantization groups.
    quantized = {
        f"{n}-4bit": convert(str(p), root / n, quantize=True, q_group_size=32) for n, p in [("v1", v1_path), ("v2", v2)]
    }
    # A learned quantization: GPTQ calibrated on images, 3 bits (the embedding at mlx-lm's 6).
    data = write_dataset(root / "data", n=8)
    argv = ["--model", str(v2), "--data-path", str(data), "--mlx-path", str(root / "v2-gptq"), "--bits", "3"]
    assert gptq_main([*argv, "--group-size", "32", "--fallback-group-size", "32"]) == 0
    quantized["v2-gptq-3bit"] = root / "v2-gptq"
    return {
        "v1": v1_path,
        "v2": v2,
        **quantized,
        "v2-bf16": checkpoints(
            "v2-kv2-bf16", "v2", dtype="bfloat16", preprocessor=v2_preprocessor, num_key_value_heads=2
        ),
        "v1-bin": checkpoints("v1-bin", "v1", fmt="bin"),
    }


@pytest.fixture(scope="module")
def runs(models, images, tmp_path_factory):
    """Each rank's results with one process and with two."""
    if not LAUNCHER.exists():
        pytest.skip("mlx.launch is not installed")
    out = tmp_path_factory.mktemp("runs")
    args = [__file__, str(out), str(images["wide"]), *(str(p) for p in models.values())]
    for processes in (1, 2):
        result = launch(processes, *args)
        assert result.returncode == 0, result.stdout + result.stderr
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("1-0", "2-0", "2-1")}


@pytest.mark.parametrize("name", ["v1", "v2", "v1-4bit", "v2-4bit", "v2-gptq-3bit", "v2-bf16", "v1-bin"])
def test_two_processes_answer_as_one(runs, models, name):
    path = str(models[name])
    one, two, other_rank = (runs[r][path] for r in ("1-0", "2-0", "2-1"))
    assert two == other_rank  # the ranks agree on every token and log-probability
    assert all(t.startswith(("AllToSharded", "ShardedToAll", "Quantized")) for t in two["layers"]), two["layers"]
    assert all(t in ("Linear", "QuantizedLinear") for t in one["layers"]), one["layers"]
    for turn_one, turn_two in zip(one["turns"], two["turns"]):
        assert len(turn_one["tokens"]) == MAX_TOKENS
        assert turn_two["tokens"] == turn_one["tokens"]
        np.testing.assert_allclose(turn_two["logprobs"], turn_one["logprobs"], atol=1e-4)


def test_generate_command_under_mlx_launch_prints_once(runs, models, images):
    model, image = str(models["v2"]), str(images["wide"])
    result = launch(
        2, "generate.py", "--model", model, "--image", image, "-p", "What is in the image?", "-m", str(MAX_TOKENS)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = runs["1-0"][model]["turns"][0]["text"]
    assert result.stdout.startswith(answer + "\n" + "=" * 10 + "\nPrompt:"), result.stdout
    assert result.stdout.count(answer) == 1, result.stdout
    assert result.stdout.count(f"Generation: {MAX_TOKENS} tokens") == 1, result.stdout


class _TwoProcesses:
    """Rank 0 of a group of two, as far as the checks before any communication ask."""

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return 0


def test_a_model_whose_heads_do_not_divide_is_refused(v2_path):
    from mlx_eve import load
    from mlx_eve.models.base import ShardingError

    with pytest.raises(ShardingError, match="1 key/value heads"):
        load(str(v2_path), group=_TwoProcesses())


def test_adapters_are_refused_when_sharding(v1_path, tmp_path):
    from mlx_eve import load
    from mlx_eve.models.base import ShardingError

    with pytest.raises(ShardingError, match="fuse"):
        load(str(v1_path), adapter_path=str(tmp_path), group=_TwoProcesses())


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
