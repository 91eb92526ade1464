"""Learned quantization calibrated on images (AWQ, GPTQ, DWQ, dynamic bits) on tiny checkpoints of both families:
the calibration reaches EVEv2's visual branch, the model moves less from the float one than rounding to nearest
does, the folder loads, answers and trains LoRA on top; bad data and bad options are refused before any work."""

import copy
import json
import os
import shutil
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_finetune import write_dataset

from mlx_eve import load, quantization, stream_generate, trainer
from mlx_eve.commands import learned_quant
from mlx_eve.commands.lora import main as lora_main
from mlx_eve.quant.calibration import distillation_loss, load_calibration, set_aside
from mlx_eve.quant.gptq import pack

GROUP = ["--group-size", "32"]
METHODS = {
    "awq": (learned_quant.awq_main, ["--bits", "3", *GROUP, "--embed-bits", "3", "--n-grid", "8"]),
    "gptq": (learned_quant.gptq_main, ["--bits", "3", *GROUP, "--fallback-bits", "3", "--fallback-group-size", "32"]),
    "dwq": (
        learned_quant.dwq_main,
        ["--bits", "3", *GROUP, "--batch-size", "3", "--iters", "12", "--learning-rate", "2e-4", "--save-every", "6"],
    ),
    "dynamic_quant": (
        learned_quant.dynamic_quant_main,
        ["--low-bits", "3", "--high-bits", "6", "--low-group-size", "32", "--high-group-size", "32"]
        + ["--target-bpw", "4.5"],
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("calibration"), n=24, seed=4)


def with_outlier_channels(source: Path, out: Path) -> Path:
    """A copy of a checkpoint whose norms scale a few channels up tenfold: the uneven activations of trained
    models, which AWQ's scales exist for (random tiny weights have none)."""
    shutil.copytree(source, out)
    for file in out.glob("*.safetensors"):
        weights = mx.load(str(file))
        for key, weight in weights.items():
            if key.endswith("layernorm.weight"):
                weights[key] = weight * mx.where(mx.arange(weight.size) % 16 == 3, 10.0, 1.0).astype(weight.dtype)
        mx.save_safetensors(str(file), weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def floats(v1_path, v2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("outliers")
    return {family: with_outlier_channels(path, root / family) for family, path in (("v1", v1_path), ("v2", v2_path))}


@pytest.fixture(scope="module")
def quantized(floats, data, tmp_path_factory):
    """Each method's output on each family, made by its command, built once."""
    root, built = tmp_path_factory.mktemp("learned"), {}

    def get(method: str, family: str):
        if (method, family) not in built:
            main, options = METHODS[method]
            out = root / f"{method}-{family}"
            path = floats[family]
            argv = ["--model", str(path), "--data-path", str(data), "--mlx-path", str(out), *options]
            assert main(argv) == 0
            built[method, family] = out
        return built[method, family]

    return get


def _distance(model, reference, samples) -> float:
    with set_aside(reference) as teacher, set_aside(model) as student:
        return distillation_loss(student, teacher, samples)


def _rounded_like(reference, learned):
    """``reference`` rounded to nearest with the very layout (bits, groups) of ``learned``."""
    rounded = copy.deepcopy(reference)
    quantization.apply(rounded, quantization.of_model(learned))
    return rounded


def _dequantized(layer) -> np.ndarray:
    return np.asarray(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_each_method_moves_the_model_less_than_rounding_and_reaches_the_visual_branch(
    method, family, quantized, floats, data, images
):
    out = quantized(method, family)
    learned, processor = load(str(out))
    reference, _ = load(str(floats[family]))
    samples = load_calibration(data, reference, processor, num_samples=-1)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32

    if method == "dynamic_quant":  # the sensitivities decide the bits; compare with all at the low width
        low = copy.deepcopy(reference)
        quantization.apply(low, quantization.plan(low, 3, 32, keep_float=low.family.patch_embedding_paths))
        assert _distance(learned, reference, samples) < _distance(low, reference, samples)
        sensitivities = json.loads((out / "sensitivities.json").read_text())
        assert set(sensitivities) == set(quantization.of_model(learned))
        bits = {p: q["bits"] for p, q in quantization.of_model(learned).items()}
        assert set(bits.values()) == {3, 6}
        assert min(sensitivities[p] for p in bits if bits[p] == 6) >= max(
            s for p, s in sensitivities.items() if bits[p] == 3
        )
    else:
        rounded = _rounded_like(reference, learned)
        assert _distance(learned, reference, samples) < _distance(rounded, reference, samples)

    # No patch embedding weight is quantized; every decoder linear is.
    stored = mx.load(str(out / "model.safetensors"))
    assert not [k for k in stored if k.endswith(".scales") and learned.family.is_patch_embedding(k)]
    layers = quantization.of_model(learned)
    assert all(f"model.layers.{i}.mlp.down_proj" in layers for i in range(len(learned.layers)))

    if family == "v2":  # the visual copies were calibrated: they differ from rounding (or carry a sensitivity)
        for i, layer in enumerate(learned.layers):
            for name in ("self_attn.moe_q_proj", "moe_mlp.down_proj"):
                path = f"model.layers.{i}.{name}"
                assert path in layers
                if method == "dynamic_quant":
                    assert sensitivities[path] != 0
                else:
                    module = dict(layer.named_modules())[name]
                    plain = dict(rounded.layers[i].named_modules())[name]
                    assert not np.allclose(_dequantized(module), _dequantized(plain)), path

    tokens = [r.token for r in stream_generate(learned, processor, "Colour?", image=str(images["wide"]), max_tokens=4)]
    assert tokens and all(0 <= t < learned.num_logits for t in tokens)


def test_qlora_trains_on_a_learned_quantization(quantized, data, tmp_path):
    out = quantized("gptq", "v2")
    argv = ["--model", str(out), "--train", "--data", str(data), "--iters", "4", "--batch-size", "2"]
    assert lora_main([*argv, "--adapter-path", str(tmp_path / "adapters"), "--steps-per-report", "2"]) == 0
    model, _ = load(str(out), adapter_path=str(tmp_path / "adapters"))
    assert any("lora_a" in k for k, _ in tree_flatten(model.parameters()))


def test_dwq_stopped_by_ctrl_c_writes_no_model_and_resumes_to_the_uninterrupted_result(
    floats, data, tmp_path, monkeypatch
):
    base = ["--model", str(floats["v1"]), "--data-path", str(data), "--bits", "3", *GROUP, "--batch-size", "3"]
    base += ["--iters", "8", "--save-every", "4", "--learning-rate", "2e-4"]
    assert learned_quant.dwq_main([*base, "--mlx-path", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole.dwq-checkpoint").exists()

    save_checkpoint = trainer.save_checkpoint

    def save_then_ctrl_c(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_ctrl_c)
    out = tmp_path / "stopped"
    assert learned_quant.dwq_main([*base, "--mlx-path", str(out)]) == 130
    assert not out.exists() and (tmp_path / "stopped.dwq-checkpoint").is_dir()
    monkeypatch.undo()
    assert learned_quant.dwq_main([*base, "--mlx-path", str(out), "--resume"]) == 0
    whole, resumed = mx.load(str(tmp_path / "whole" / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_allclose(np.asarray(resumed[key]), np.asarray(whole[key]), atol=1e-6, err_msg=key)


def test_dwq_improves_an_already_quantized_student(quantized, floats, data, tmp_path):
    gptq = quantized("gptq", "v2")
    out = tmp_path / "dwq-on-gptq"
    argv = [
        "--model",
        str(floats["v2"]),
        "--quantized-model",
        str(gptq),
        "--data-path",
        str(data),
        "--mlx-path",
        str(out),
    ]
    options = ["--batch-size", "3", "--iters", "12", "--learning-rate", "2e-4"]
    assert learned_quant.dwq_main([*argv, *options]) == 0
    reference, processor = load(str(floats["v2"]))
    samples = load_calibration(data, reference, processor, num_samples=-1)
    improved, student = load(str(out))[0], load(str(gptq))[0]
    assert quantization.of_model(improved) == quantization.of_model(student)
    assert _distance(improved, reference, samples) < _distance(student, reference, samples)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlx_s_own(bits):
    w = mx.random.normal((6, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    on_grid = mx.dequantize(packed, scales, biases, group_size=32, bits=bits)
    assert np.array_equal(np.asarray(pack(on_grid, bits, scales, biases)), np.asarray(packed))


def test_bad_data_is_reported_with_its_line_before_any_work(v2_path, data, tmp_path, capsys):
    lines = (data / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images").symlink_to(data / "images")
    (bad / "train.jsonl").write_text("\n".join([lines[0], "{not json", lines[1], '{"image": "images/0.png"}']) + "\n")
    out = tmp_path / "out"
    argv = ["--model", str(v2_path), "--data-path", str(bad), "--mlx-path", str(out)]
    for main in (learned_quant.gptq_main, learned_quant.dwq_main):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "train.jsonl:2: invalid JSON" in err and "train.jsonl:4" in err
        assert not out.exists()


def test_text_only_data_cannot_calibrate_the_visual_branch(v2_path, tmp_path, capsys):
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]}
    (tmp_path / "text.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["--model", str(v2_path), "--data-path", str(tmp_path / "text.jsonl"), "--mlx-path", str(tmp_path / "o")]
    assert learned_quant.awq_main(argv) == 1
    assert "visual branch" in capsys.readouterr().err


def test_an_interrupted_run_leaves_nothing_that_looks_finished(v2_path, data, tmp_path, monkeypatch, capsys):
    import mlx_eve.saving

    def interrupted(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_eve.saving, "write_weights", interrupted)
    out = tmp_path / "out"
    argv = ["--model", str(v2_path), "--data-path", str(data), "--mlx-path", str(out), "--num-samples", "4"]
    assert learned_quant.gptq_main(argv) == 130
    assert not out.exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "main,options,message",
    [
        (learned_quant.awq_main, ["--bits", "7"], "invalid choice: 7"),
        (learned_quant.gptq_main, ["--group-size", "48"], "invalid choice: 48"),
        (learned_quant.gptq_main, ["--num-samples", "0"], "an integer >= 1, or -1 for all"),
        (learned_quant.dwq_main, ["--learning-rate", "-1"], "a number > 0"),
        (learned_quant.dwq_main, ["--seed", "-3"], "an integer from 0"),
        (learned_quant.dynamic_quant_main, ["--target-bpw", "12"], "bits per weight from 2 to 9"),
        (learned_quant.dynamic_quant_main, ["--low-bits", "4", "--high-bits", "3"], "--high-bits must be more"),
        (learned_quant.awq_main, ["--data-path", "/no/such/data"], "no such file or folder"),
    ],
)
def test_bad_options_are_one_line_before_loading(main, options, message, v2_path, data, capsys):
    argv = ["--model", str(v2_path), "--data-path", str(data), *options]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
