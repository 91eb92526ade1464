"""Broken model folders and adapters: each is refused with one clear message, by the Python API (an
``EVEError``) and by the command line (one ``error:`` line, exit code 1, no traceback)."""

import json
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
from zero_adapters import write_zero_adapters

from mlx_eve import load
from mlx_eve.commands.generate import main as generate_main
from mlx_eve.errors import CheckpointError


def edit_json(name: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        file = folder / name
        file.write_text(json.dumps(change(json.loads(file.read_text()))))

    return apply


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def remove(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / name).unlink() for name in names]


def without(key: str) -> Callable[[dict], dict]:
    return lambda config: {k: v for k, v in config.items() if k != key}


def with_values(**values) -> Callable[[dict], dict]:
    return lambda config: {**config, **values}


def retype(key: str, dtype: mx.Dtype) -> Callable[[Path], None]:
    """Store one weight as another dtype, in whichever shard holds it."""

    def apply(folder: Path) -> None:
        shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
        weights = dict(mx.load(str(shard)))
        weights[key] = (weights[key] * 100).astype(dtype)
        mx.save_safetensors(str(shard), weights)

    return apply


BROKEN_FOLDERS = {
    "config is not JSON": (write("config.json", "{"), "config.json is not valid JSON"),
    "config is a JSON list": (write("config.json", "[]"), "should hold a JSON object, not a list"),
    "config without model_type": (edit_json("config.json", without("model_type")), "has no model_type"),
    "unknown model_type": (edit_json("config.json", with_values(model_type="llava")), "Unknown model_type 'llava'"),
    "config without hidden_size": (edit_json("config.json", without("hidden_size")), "hidden_size is missing"),
    "zero attention heads": (
        edit_json("config.json", with_values(num_attention_heads=0)),
        "num_attention_heads is 0, which is less than 1",
    ),
    "a string where a number belongs": (
        edit_json("config.json", with_values(hidden_size="64")),
        "hidden_size is '64', which is not an integer",
    ),
    "heads not a multiple of the KV heads": (
        edit_json("config.json", with_values(num_key_value_heads=3, num_attention_heads=4)),
        r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)",
    ),
    "weight index is not JSON": (write("model.safetensors.index.json", "{"), "is not a valid weight index"),
    "weight index without weight_map": (
        write("model.safetensors.index.json", '{"metadata": {}}'),
        "is not a valid weight index",
    ),
    "preprocessor config is not JSON": (
        write("preprocessor_config.json", "{"),
        "preprocessor_config.json is not valid",
    ),
    "preprocessor value of the wrong type": (
        edit_json("preprocessor_config.json", with_values(max_size="big")),
        "max_size is 'big', which is not an integer",
    ),
    "no tokenizer at all": (
        remove("tokenizer.json", "vocab.json", "merges.txt"),
        r"has no tokenizer \(none of tokenizer.json",
    ),
    "tokenizer.json is not JSON": (
        lambda folder: [(folder / name).write_text("{not json") for name in ("tokenizer.json", "vocab.json")],
        "The tokenizer in .* could not be read",
    ),
    "an int8 LM head": (retype("lm_head.weight", mx.int8), r"of the wrong type: lm_head.weight \(checkpoint int8"),
    "an int32 norm": (retype("model.norm.weight", mx.int32), r"model.norm.weight \(checkpoint int32, model float32\)"),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_a_broken_model_folder_is_one_clear_error(case, v2_path, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(v2_path, folder)
    damage, message = BROKEN_FOLDERS[case]
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        load(str(folder))
    capsys.readouterr()
    assert generate_main(["--model", str(folder), "-p", "Hello"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    if case not in ("an int8 LM head", "an int32 norm"):  # those list the weights, one per line
        assert err.count("\n") == 1, err


def test_weights_with_nan_or_inf_load_with_a_warning_naming_them(v2_path, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(v2_path, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for key, value in (("model.norm.weight", np.nan), ("model.layers.1.mlp.up_proj.weight", np.inf)):
        shard = folder / index[key]
        weights = dict(mx.load(str(shard)))
        weights[key] = mx.array(np.where(np.arange(weights[key].size).reshape(weights[key].shape) == 3, value, 1.0))
        mx.save_safetensors(str(shard), weights)
    capsys.readouterr()
    load(str(folder))
    err = capsys.readouterr().err
    assert "[WARNING] 2 weight(s)" in err and "NaN or Inf" in err
    assert "model.norm.weight" in err and "model.layers.1.mlp.up_proj.weight" in err
    load(str(v2_path))
    assert "NaN" not in capsys.readouterr().err


@pytest.fixture
def adapters(v2_path, tmp_path):
    return write_zero_adapters(v2_path, tmp_path / "adapters")


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _drop_one_tensor(file: Path) -> None:
    weights = dict(mx.load(str(file)))
    weights.pop(sorted(weights)[0])
    mx.save_safetensors(str(file), weights)


BROKEN_ADAPTERS = {
    "truncated weights": (
        lambda folder: _truncate(folder / "adapters.safetensors"),
        "Could not read .*adapters.safetensors",
    ),
    "config is not JSON": (
        write("adapter_config.json", "{"),
        "adapter_config.json is not a valid adapter configuration",
    ),
    "config without num_layers": (
        edit_json("adapter_config.json", without("num_layers")),
        "adapter_config.json is not a valid adapter configuration",
    ),
    "one LoRA tensor missing": (
        lambda folder: _drop_one_tensor(folder / "adapters.safetensors"),
        r"model.layers.0.mlp.down_proj.lora_a: missing from the adapters",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_ADAPTERS))
def test_broken_adapters_are_one_clear_error(case, adapters, v2_path, capsys):
    load(str(v2_path), adapter_path=str(adapters))  # intact, they load
    damage, message = BROKEN_ADAPTERS[case]
    damage(adapters)
    with pytest.raises(CheckpointError, match=message):
        load(str(v2_path), adapter_path=str(adapters))
    capsys.readouterr()
    assert generate_main(["--model", str(v2_path), "--adapter-path", str(adapters), "-p", "Hello"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


BAD_PROMPTS = {
    "None": (None, [], "must be a question .* not None"),
    "an empty conversation": ([], [], "The conversation is empty"),
    "a lone system message": ([{"role": "system", "content": "Be brief."}], [], "only a system message"),
    "content None": ([{"role": "user", "content": None}], [], r"Message 0 \(user\) has no text"),
    "an unknown role": ([{"role": "bot", "content": "Hi"}], [], "has the role 'bot'"),
    "two user messages in a row": (
        [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}],
        [],
        "Message 1 should be the assistant's",
    ),
    "ending with the assistant": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [],
        "must end with a user message",
    ),
    "more placeholders than images": ("<image> and <image>?", ["wide"], "2 <image> placeholder.* 1 image"),
    "fewer placeholders than images": ("<image> and?", ["wide", "tall"], "1 <image> placeholder.* 2 image"),
    "an image in the system prompt": (
        [{"role": "system", "content": "Look: <image>"}, {"role": "user", "content": "Hi"}],
        [],
        "system prompt may not contain <image>",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_a_bad_prompt_is_a_prompt_error(case, v2_model, images):
    from mlx_eve import generate
    from mlx_eve.errors import PromptError

    model, processor = v2_model
    prompt, image_names, message = BAD_PROMPTS[case]
    with pytest.raises(PromptError, match=message):
        generate(model, processor, prompt, image=[images[name] for name in image_names], max_tokens=2)


REFUSED_WHEN_PARSED = {
    "-m 0": ["-m", "0"],
    "negative --max-tokens": ["--max-tokens", "-5"],
    "--max-tokens not a number": ["--max-tokens", "many"],
    "--max-size 0": ["--max-size", "0"],
    "negative --max-size": ["--max-size", "-3"],
    "--prefill-step-size 0": ["--prefill-step-size", "0"],
    "negative temperature": ["--temp", "-1"],
    "--top-p above 1": ["--top-p", "2"],
    "--top-p 0": ["--top-p", "0"],
    "--min-p above 1": ["--min-p", "2"],
    "negative --top-k": ["--top-k", "-1"],
    "--temp nan": ["--temp", "nan"],
    "--kv-bits 7": ["--kv-bits", "7"],
    "--repetition-penalty 0": ["--repetition-penalty", "0"],
}


@pytest.mark.parametrize("case", list(REFUSED_WHEN_PARSED))
def test_generate_refuses_out_of_range_options_in_one_line(case, capsys):
    with pytest.raises(SystemExit) as exit:
        generate_main([*REFUSED_WHEN_PARSED[case], "-p", "Hi"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: argument ") and err.count("\n") == 1, err


REFUSED_WHEN_RUN = {
    "more placeholders than images": (["-p", "<image> and <image>?", "--image", "wide"], "2 <image> placeholder"),
    "an image in the system prompt": (["-p", "Hi", "--system-prompt", "See <image>"], "system prompt may not"),
    "no image and no question": ([], "Give a question with -p/--prompt"),
    "a resolution below one image token": (["--image", "wide", "-p", "Hi", "--max-size", "16"], "at least 32"),
    "stdin that is not UTF-8": (["-p", "-"], "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(REFUSED_WHEN_RUN))
def test_generate_reports_bad_requests_in_one_line(case, v2_path, images, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"What is \xff\xfe this?")))
    argv, message = REFUSED_WHEN_RUN[case]
    argv = [str(images[a]) if a in images else a for a in argv]
    assert generate_main(["--model", str(v2_path), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_data_line_that_is_not_utf8_is_reported_with_its_line(v2_model, tmp_path, images):
    from mlx_eve.data import DataError, load_splits

    _, processor = v2_model
    good = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]})
    (tmp_path / "train.jsonl").write_bytes(
        f"{good}\n".encode() + b'{"conversations": "caf\xe9"}\n' + f"{good}\n".encode()
    )
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 text"):
        load_splits(tmp_path, processor, 4096)
    (tmp_path / "train.json").write_bytes(b'[\n{"a": 1},\n"\xff"\n]')
    with pytest.raises(DataError, match=r"train.json:3: not UTF-8 text"):
        load_splits(tmp_path / "train.json", processor, 4096)


def test_an_image_outside_the_data_folder_works_with_one_warning(v2_model, tmp_path, images, capsys):
    from mlx_eve.data import load_splits

    _, processor = v2_model
    (tmp_path / "data").mkdir()
    shutil.copy(images["wide"], tmp_path / "data" / "inside.png")
    shutil.copy(images["tall"], tmp_path / "outside.png")

    def record(path):
        return {
            "image": path,
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
        }

    lines = [record("inside.png"), record("../outside.png"), record(str(tmp_path / "outside.png"))]
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()
    samples = load_splits(tmp_path / "data", processor, 4096)["train"]
    assert [s.images[0].name for s in samples] == ["inside.png", "outside.png", "outside.png"]
    err = capsys.readouterr().err
    assert err.count("[WARNING]") == 1 and "2 image path(s) lead outside the data folder" in err
    assert "train.jsonl:2" in err and "train.jsonl:3" in err and "inside.png" not in err
