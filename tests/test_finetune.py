"""Fine-tuning: data checks, answer-only loss on mixed-size batches, LoRA/QLoRA/full, checkpoints, resume,
Ctrl-C, NaN, adapters everywhere, fuse, data parallelism."""

import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image, ImageDraw

from mlx_eve import load
from mlx_eve.adapters import prepare_model
from mlx_eve.commands.lora import main as lora_main
from mlx_eve.commands.lora import resolve_args
from mlx_eve.data import DataError, load_splits
from mlx_eve.fine_tuning import adapter_config
from mlx_eve.models import IMAGE_TOKEN_ID
from mlx_eve.trainer import (
    TrainingArgs,
    TrainingError,
    batch_embeddings,
    learning_rate_schedule,
    loss_sum,
    make_batch,
    parameter_counts,
    train,
    training_args,
)

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def write_dataset(folder: Path, n: int = 24, seed: int = 0, style: str = "llava") -> Path:
    """Images of one coloured circle, of varied sizes; the answer is its colour."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(40, 130, 2))
        colour = list(COLOURS)[i % 3]
        image = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(image).ellipse((w * 0.2, h * 0.2, w * 0.8, h * 0.8), fill=COLOURS[colour])
        image.save(folder / "images" / f"{i}.png")
        question = "<image>\nWhat colour is the circle?"
        if style == "llava":
            records.append(
                {
                    "image": f"images/{i}.png",
                    "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": colour}],
                }
            )
        else:
            records.append(
                {
                    "images": [f"images/{i}.png"],
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": colour}],
                }
            )
    cut = int(n * 0.75)
    for split, part in (("train", records[:cut]), ("valid", records[cut:]), ("test", records[cut:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("colours"))


def test_both_formats_multi_turn_and_text_only_and_answer_only_targets(v2_model, tmp_path, images):
    _, processor = v2_model
    Image.open(images["wide"]).save(tmp_path / "a.png")
    llava = [
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Shape?"},
                {"from": "gpt", "value": "a circle"},
            ],
        },
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "hello"},
            ]
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    vlm = {
        "images": ["a.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
        ],
    }
    (tmp_path / "train.jsonl").write_text(json.dumps(vlm) + "\n")
    multi, text_only = load_splits(tmp_path / "llava.json", processor, 4096)["train"]
    (from_vlm,) = load_splits(tmp_path, processor, 4096)["train"]
    decode = lambda s: processor.tokenizer.decode([int(i) for i, t in zip(s.input_ids, s.targets) if t])  # noqa: E731
    assert decode(multi) == " red<|im_end|> a circle<|im_end|>"
    assert decode(text_only) == " hello<|im_end|>" and text_only.images == []
    assert decode(from_vlm) == " red<|im_end|>"
    n_image = processor.image_processor.num_tokens(320, 240)
    assert (multi.input_ids == IMAGE_TOKEN_ID).sum() == n_image and not multi.targets[
        multi.input_ids == IMAGE_TOKEN_ID
    ].any()
    assert np.array_equal(
        multi.input_ids[: len(from_vlm.input_ids) - 5], from_vlm.input_ids[: len(from_vlm.input_ids) - 5]
    )


def test_every_data_problem_is_reported_with_its_line_before_training(v2_model, tmp_path, dataset):
    _, processor = v2_model
    lines = (dataset / "train.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    lines[3] = json.dumps(
        {
            "image": "images/missing.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        }
    )
    lines[5] = json.dumps({"conversations": [{"from": "human", "value": "Q"}]})
    lines[7] = json.dumps({"conversations": [{"from": "human", "value": "word " * 300}, {"from": "gpt", "value": "A"}]})
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load_splits(tmp_path, processor, max_seq_length=256, image_folder=dataset)
    message = str(error.value)
    assert "4 problem(s)" in message
    train = tmp_path / "train.jsonl"
    assert f"{train}:2: invalid JSON" in message
    assert f"{train}:4: image not found: {dataset / 'images' / 'missing.png'}" in message
    assert f"{train}:6: no assistant turn" in message
    assert f"{train}:8: " in message and "exceed --max-seq-length 256" in message


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_mixed_size_batches_equal_their_samples_one_by_one(family, v1_model, v2_model, dataset):
    model, processor = v1_model if family == "v1" else v2_model
    samples = load_splits(dataset, processor, 4096)["train"][:3]
    assert len({len(s.input_ids) for s in samples}) == 3  # different image sizes, different lengths
    batch = make_batch(samples, processor.image_processor)
    embeddings = batch_embeddings(model, batch)
    total, tokens = loss_sum(model, batch)
    singles = [loss_sum(model, make_batch([s], processor.image_processor)) for s in samples]
    for row, sample in enumerate(samples):
        alone = model.embed_inputs(
            mx.array(sample.input_ids),
            [mx.array(processor.image_processor(Image.open(p).convert("RGB"))) for p in sample.images],
        )
        n = len(sample.input_ids)
        np.testing.assert_allclose(np.asarray(embeddings[row, :n]), np.asarray(alone), atol=1e-6)
        assert not np.asarray(embeddings[row, n:]).any()  # padding
    assert tokens.item() == sum(n.item() for _, n in singles) == sum(s.num_targets for s in samples)
    np.testing.assert_allclose(total.item(), sum(loss.item() for loss, _ in singles), rtol=1e-4)


def _training_args(**options) -> TrainingArgs:
    """The training loop's options: the command line's defaults, with ``options`` instead."""
    return training_args(types.SimpleNamespace(**{**vars(resolve_args([])), **options}))


def _train(model, processor, dataset, adapter_path, resume=False, loss=loss_sum, **kwargs):
    splits = load_splits(dataset, processor, 4096)
    args = _training_args(
        **{
            "batch_size": 4,
            "iters": 10,
            "learning_rate": 1e-3,
            "steps_per_report": 5,
            "steps_per_eval": 100,
            "save_every": 5,
            **kwargs,
        }
    )
    log = []
    train(
        model, processor.image_processor, splits["train"], splits["valid"], args, adapter_path, resume, log.append, loss
    )
    return log


def _losses(log):
    return [float(line.split("Train loss ")[1].split(",")[0]) for line in log if "Train loss" in line]


def lora_argv(model, data, *switches: str, **options) -> list:
    """A ``mlx_eve.lora`` command line: ``--model``, ``--data``, the ``switches`` (``--train``), then each option
    (``batch_size=4`` → ``--batch-size 4``)."""
    argv = ["--model", str(model), "--data", str(data), *switches]
    for name, value in options.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def _lora(path, targets, fine_tune_type="lora", **extra):
    model, processor = load(str(path))
    args = resolve_args(
        ["--fine-tune-type", fine_tune_type, "--targets", targets, "--lora-rank", "4", *extra.get("argv", [])]
    )
    prepare_model(model, adapter_config(args, model))
    return model, processor


def test_visual_branch_only_learns_from_image_tokens(v2_path, dataset, tmp_path):
    """Modality routing holds in training: visual-branch LoRA gets no gradient from text-only samples."""
    model, processor = _lora(v2_path, "visual")
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}]}) + "\n"
    )
    batch = make_batch(load_splits(text_only, processor, 4096)["train"], processor.image_processor)
    for layer in model.layers:  # LoRA B starts at zero; make the A-side gradient visible too
        layer.self_attn.moe_q_proj.lora_b = mx.ones_like(layer.self_attn.moe_q_proj.lora_b)
    _, grads = nn.value_and_grad(model, lambda m, b: loss_sum(m, b)[0])(model, batch)
    assert all(not np.asarray(g).any() for _, g in tree_flatten(grads))
    image_batch = make_batch(load_splits(dataset, processor, 4096)["train"][:2], processor.image_processor)
    _, grads = nn.value_and_grad(model, lambda m, b: loss_sum(m, b)[0])(model, image_batch)
    assert any(np.asarray(g).any() for _, g in tree_flatten(grads))


@pytest.mark.parametrize("family,targets", [("v1", "decoder"), ("v2", "both")])
def test_lora_training_lowers_the_loss(family, targets, v1_path, v2_path, dataset, tmp_path):
    model, processor = _lora(v1_path if family == "v1" else v2_path, targets)
    frozen = {k: np.asarray(v) for k, v in tree_flatten(model.parameters()) if "lora" not in k}
    losses = _losses(_train(model, processor, dataset, tmp_path / "a", iters=20))
    assert losses[-1] < losses[0] * 0.5
    assert all(np.array_equal(frozen[k], np.asarray(v)) for k, v in tree_flatten(model.parameters()) if "lora" not in k)


def test_qlora_on_a_4bit_conversion_and_full_training(v2_path, dataset, tmp_path):
    from mlx_eve.conversion import convert

    q4 = convert(str(v2_path), tmp_path / "q4", quantize=True)
    model, processor = _lora(q4, "both")
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    losses = _losses(_train(model, processor, dataset, tmp_path / "qlora", iters=20))
    assert losses[-1] < losses[0] * 0.5
    full, processor = _lora(v2_path, "both", fine_tune_type="full", argv=["--train-patch-embedding"])
    before = {k: np.asarray(v) for k, v in tree_flatten(full.parameters())}
    _train(full, processor, dataset, tmp_path / "full", iters=3, save_every=3)
    after = dict(tree_flatten(full.parameters()))
    unchanged = [k for k, v in after.items() if np.array_equal(before[k], np.asarray(v))]
    # Only embedding rows of tokens never seen (and parameters without gradient) may stay the same.
    assert not [k for k in unchanged if "embed_tokens" not in k and "lm_head" not in k and "moe" not in k]
    assert "model.vision_tower.patch_embedding.0.weight" not in unchanged


def test_patch_embedding_learning_rate_scale(v2_path, dataset, tmp_path):
    """MLX's Adam (no bias correction) first moves a weight by lr * (1 - b1) g / sqrt((1 - b2) g^2) = 3.162 lr."""
    model, processor = _lora(v2_path, "both", fine_tune_type="full", argv=["--train-patch-embedding"])
    before = {k: np.asarray(v) for k, v in tree_flatten(model.parameters())}
    _train(model, processor, dataset, tmp_path / "run", iters=1, learning_rate=1e-3, patch_embedding_lr_scale=0.1)
    step = {k: np.abs(np.asarray(v) - before[k]).max() for k, v in tree_flatten(model.parameters())}
    patch = [v for k, v in step.items() if k.startswith("model.vision_tower.")]
    rest = [v for k, v in step.items() if not k.startswith("model.vision_tower.")]
    assert patch and rest
    first_step = 0.1 / np.sqrt(0.001)
    np.testing.assert_allclose(max(patch), 1e-4 * first_step, rtol=1e-3)
    np.testing.assert_allclose(max(rest), 1e-3 * first_step, rtol=1e-3)


@pytest.mark.parametrize(
    "options,learning_rates",
    [
        ({"patch_embedding_lr_scale": 1.0}, ["1.000e-03", "1.000e-03"]),
        # warm-up over updates 0-3, the peak again at update 4 (step 5), then down to 10 % at the last
        ({"patch_embedding_lr_scale": 0.1, "lr_schedule": "cosine", "warmup": 3}, ["1.000e-03", "1.000e-04"]),
    ],
)
def test_resume_continues_exactly(v2_path, dataset, tmp_path, options, learning_rates):
    # dropout draws random numbers: the random state must be restored too; a separate learning rate
    # for the patch embedding means two optimizer states to restore; a schedule must continue at its step.
    argv = ["--lora-dropout", "0.1", "--train-patch-embedding"]
    straight, processor = _lora(v2_path, "both", argv=argv)
    log = _train(straight, processor, dataset, tmp_path / "straight", iters=10, save_every=5, **options)
    assert [line.split("Learning Rate ")[1].split(",")[0] for line in log if "Train loss" in line] == learning_rates
    splits = load_splits(dataset, processor, 4096)
    args = _training_args(
        batch_size=4, iters=10, learning_rate=1e-3, steps_per_report=5, steps_per_eval=100, save_every=5, **options
    )

    def crash_after_saving(line):  # the same run, killed once the step-5 checkpoint is written
        if "Saved checkpoint" in line:
            raise RuntimeError("killed")

    first, processor = _lora(v2_path, "both", argv=argv)
    with pytest.raises(RuntimeError, match="killed"):
        train(
            first,
            processor.image_processor,
            splits["train"],
            splits["valid"],
            args,
            tmp_path / "split",
            report=crash_after_saving,
        )
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["step"] == 5
    second, processor = _lora(v2_path, "both", argv=argv)
    train(
        second,
        processor.image_processor,
        splits["train"],
        splits["valid"],
        args,
        tmp_path / "split",
        resume=True,
        report=lambda m: None,
    )
    a = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "split" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(v2_path, dataset, tmp_path):
    calls = [0]

    def diverging(model, batch):  # the loss turns NaN on the 7th training step
        calls[0] += model.training  # the check of a checkpoint's weights runs in eval mode
        total, tokens = loss_sum(model, batch)
        return (total * mx.nan if calls[0] == 7 else total), tokens

    model, processor = _lora(v2_path, "both")
    with pytest.raises(TrainingError, match=r"became nan at step 7; .*last good checkpoint \(step 6\)"):
        _train(model, processor, dataset, tmp_path / "nan", loss=diverging, iters=30, save_every=3, steps_per_eval=1000)
    assert json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())["step"] == 6
    weights = mx.load(str(tmp_path / "nan" / "checkpoint" / "adapters.safetensors"))
    assert all(np.isfinite(np.asarray(v)).all() for v in weights.values())
    assert mx.load(str(tmp_path / "nan" / "adapters.safetensors")).keys() == weights.keys()


@pytest.mark.parametrize("save_every", [1, 3])
def test_exploding_weights_are_never_called_a_good_checkpoint(v2_path, dataset, tmp_path, save_every):
    """At learning rate 1e30 the first update makes the weights enormous: the loss on them is not finite, so
    no checkpoint of them may be kept or named, whenever checkpoints fall."""
    model, processor = _lora(v2_path, "both", fine_tune_type="full")
    with pytest.raises(TrainingError) as error:
        _train(model, processor, dataset, tmp_path / "run", iters=10, learning_rate=1e30, save_every=save_every)
    assert "No checkpoint was saved before it" in str(error.value) and "--learning-rate" in str(error.value)
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "adapters.safetensors").exists()


def test_a_good_checkpoint_survives_a_later_explosion(v2_path, dataset, tmp_path, monkeypatch):
    import mlx_eve.trainer as trainer

    model, processor = _lora(v2_path, "both")
    real_update = trainer.optim.Adam.update

    def update(self, model, gradients):  # the 6th update blows the weights up, just before a checkpoint
        real_update(self, model, gradients)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 6:
            model.update(trainer.tree_map(lambda w: w * 1e30, model.trainable_parameters()))

    monkeypatch.setattr(trainer.optim.Adam, "update", update)
    with pytest.raises(TrainingError, match=r"after the update of step 6; .*last good checkpoint \(step 3\)"):
        _train(model, processor, dataset, tmp_path / "run", iters=10, save_every=3, steps_per_eval=1000)
    weights = mx.load(str(tmp_path / "run" / "checkpoint" / "adapters.safetensors"))
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert max(np.abs(np.asarray(v)).max() for v in weights.values()) < 10


def test_resume_without_a_checkpoint_says_so(v2_path, dataset, tmp_path, capsys):
    argv = lora_argv(v2_path, dataset, "--train", "--resume", adapter_path=tmp_path / "none")
    assert lora_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Nothing to resume") and err.count("\n") == 1


@pytest.mark.parametrize("left", ["checkpoint.old", "checkpoint.incomplete"])
def test_resume_finds_a_checkpoint_a_crash_left_mid_swap(v2_path, dataset, tmp_path, left):
    """save_checkpoint renames the old checkpoint aside, then the new one into place: killed in between,
    the newest complete checkpoint is one of those two."""
    model, processor = _lora(v2_path, "both")
    _train(model, processor, dataset, tmp_path / "run", iters=4, save_every=2)
    (tmp_path / "run" / "checkpoint").rename(tmp_path / "run" / left)
    resumed, _ = _lora(v2_path, "both")
    log = _train(resumed, processor, dataset, tmp_path / "run", iters=6, save_every=2, resume=True)
    assert log[0] == "Resuming from step 4."


def test_divergence_without_nan_is_warned_about():
    from mlx_eve.trainer import DivergenceWatch

    said = []
    watch = DivergenceWatch()
    watch.step(1.7)  # the first step's loss
    for step, window in ((10, 1.2), (20, 0.8), (30, 1.0), (40, 1.31), (50, 2.8), (60, 2.9), (70, 0.9), (80, 2.5)):
        watch.report(step, window, said.append)
    # 1.5 x the lowest (0.8) + 0.1 = 1.3: warned when crossing, not again while above, again after recovering.
    assert [line.split(" rose to ")[1].split(",")[0] for line in said] == ["1.310", "2.500"]
    assert "from 0.800 at step 20" in said[0] and "--learning-rate" in said[0]
    flat, said = DivergenceWatch(), []
    flat.step(1.7)
    flat.report(10, 6.0, said.append)  # jumped at once and stayed: learning rate 1e3 on the demo model
    assert len(said) == 1 and "from 1.700 at step 1" in said[0]


def run_lora(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_eve.lora", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_ctrl_c_saves_and_resume_continues(v2_path, dataset, tmp_path):
    adapters = tmp_path / "adapters"
    common = lora_argv(
        v2_path,
        dataset,
        adapter_path=adapters,
        batch_size=4,
        learning_rate="1e-3",
        steps_per_report=1,
        steps_per_eval=1000,
    )
    process = run_lora("--train", "--iters", "100000", "--save-every", "100000", *common)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("Iter 3: Train loss"):  # once: a second Ctrl-C would abort without saving
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, "".join(output)  # interrupted, though saved
    stopped = int(next(line for line in output if line.startswith("Stopped at step")).split()[3].rstrip(";"))
    assert stopped >= 3
    assert json.loads((adapters / "checkpoint" / "state.json").read_text())["step"] == stopped
    resumed = run_lora("--train", "--resume", "--iters", str(stopped + 2), "--save-every", "1000", *common)
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    assert f"Resuming from step {stopped}." in text and f"Iter {stopped + 1}: Train loss" in text


def test_adapters_load_everywhere_and_fuse(v2_path, dataset, tmp_path, images):
    config = tmp_path / "config.yaml"
    options = f"model: {v2_path}\ndata: {dataset}\ntrain: true\niters: 6\nbatch_size: 4\nlearning_rate: 0.001\n"
    config.write_text(options + "save_every: 3\nlora_parameters:\n  rank: 4\n  scale: 10.0\n")
    adapters = tmp_path / "adapters"
    assert lora_main(["-c", str(config), "--adapter-path", str(adapters), "--targets", "visual"]) == 0
    saved = json.loads((adapters / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["rank"] == 4 and saved["lora_parameters"]["scale"] == 10.0 and saved["iters"] == 6
    assert saved["lora_parameters"]["keys"][0] == "self_attn.moe_q_proj" and saved["fine_tune_type"] == "lora"
    adapted, processor = load(str(v2_path), adapter_path=str(adapters))
    inputs = processor("What colour is the circle?", images=[images["wide"]])

    def logits(m):
        return np.asarray(
            m(inputs.input_ids[None], input_embeddings=m.embed_inputs(inputs.input_ids, inputs.pixel_values)[None])
        )

    from mlx_eve.fusion import fuse

    fused, _ = load(str(fuse(str(v2_path), str(adapters), str(tmp_path / "fused"))))
    np.testing.assert_allclose(logits(fused), logits(adapted), atol=1e-4)
    base, _ = load(str(v2_path))
    assert np.abs(logits(base) - logits(adapted)).max() > 1e-3
    cli = subprocess.run(
        [
            sys.executable,
            "generate.py",
            "--model",
            str(v2_path),
            "--adapter-path",
            str(adapters),
            "--image",
            str(images["wide"]),
            "-p",
            "Colour?",
            "-m",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "Generation: 3 tokens" in cli.stdout, cli.stderr


def test_lora_with_the_patch_embedding_loads_and_fuses_and_foreign_tensors_are_refused(v2_path, dataset, tmp_path):
    from mlx_eve.errors import CheckpointError
    from mlx_eve.fusion import fuse

    adapters = tmp_path / "adapters"
    argv = lora_argv(v2_path, dataset, "--train", iters=2, batch_size=4, learning_rate="1e-2")
    assert lora_main([*argv, "--train-patch-embedding", "--adapter-path", str(adapters)]) == 0
    saved = mx.load(str(adapters / "adapters.safetensors"))
    key = "model.vision_tower.patch_embedding.0.weight"
    base = dict(tree_flatten(load(str(v2_path))[0].parameters()))
    assert not np.array_equal(np.asarray(saved[key]), np.asarray(base[key]))
    for model_path in (v2_path, fuse(str(v2_path), str(adapters), str(tmp_path / "fused"))):
        adapted = dict(
            tree_flatten(
                load(str(model_path), adapter_path=None if model_path != v2_path else str(adapters))[0].parameters()
            )
        )
        np.testing.assert_array_equal(np.asarray(adapted[key]), np.asarray(saved[key]))
    saved["model.norm.weight"] = base["model.norm.weight"]
    mx.save_safetensors(str(adapters / "adapters.safetensors"), saved)
    with pytest.raises(CheckpointError, match="model.norm.weight: not a parameter these adapters train"):
        load(str(v2_path), adapter_path=str(adapters))


def test_full_training_with_a_frozen_patch_embedding_keeps_it_and_loads_back(v2_path, dataset, tmp_path):
    adapters = tmp_path / "adapters"
    argv = lora_argv(v2_path, dataset, "--train", iters=2, batch_size=4, learning_rate="1e-2")
    assert (
        lora_main([*argv, "--fine-tune-type", "full", "--freeze-patch-embedding", "--adapter-path", str(adapters)]) == 0
    )
    saved = mx.load(str(adapters / "adapters.safetensors"))
    base = dict(tree_flatten(load(str(v2_path))[0].parameters()))
    assert not [k for k in saved if "vision_tower" in k]
    assert set(saved) == {k for k in base if "vision_tower" not in k}
    assert not np.array_equal(np.asarray(saved["model.norm.weight"]), np.asarray(base["model.norm.weight"]))
    adapted = dict(tree_flatten(load(str(v2_path), adapter_path=str(adapters))[0].parameters()))
    for k, v in base.items():
        np.testing.assert_array_equal(np.asarray(adapted[k]), np.asarray(saved[k] if k in saved else v))
    for wrong in (
        ["--freeze-patch-embedding"],
        ["--fine-tune-type", "full", "--freeze-patch-embedding", "--train-patch-embedding"],
        ["--fine-tune-type", "full", "--freeze-patch-embedding", "--patch-embedding-lr-scale", "0.1"],
        ["--patch-embedding-lr-scale", "0.1"],  # LoRA leaves the patch embedding as it is
    ):
        assert lora_main([*argv, *wrong, "--adapter-path", str(tmp_path / "x")]) != 0


def test_fuse_into_a_quantized_base_warns_and_can_dequantize(v2_path, dataset, tmp_path, capfd):
    from mlx_eve.conversion import convert
    from mlx_eve.fusion import fuse

    q8 = convert(str(v2_path), tmp_path / "q8", quantize=True, q_bits=8)
    assert lora_main(lora_argv(q8, dataset, "--train", iters=2, batch_size=4, adapter_path=tmp_path / "a")) == 0
    requantized, _ = load(str(fuse(str(q8), str(tmp_path / "a"), str(tmp_path / "f1"))))
    assert "base model is quantized" in capfd.readouterr().err
    assert isinstance(requantized.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    floating, _ = load(str(fuse(str(q8), str(tmp_path / "a"), str(tmp_path / "f2"), dequantize=True)))
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in floating.named_modules())
    assert "quantization" not in json.loads((tmp_path / "f2" / "config.json").read_text())


def test_two_processes_train_like_one_with_the_same_global_batch(v2_path, dataset, tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed")
    script = tmp_path / "lora_entry.py"
    script.write_text("import sys\nfrom mlx_eve.commands.lora import main\nsys.exit(main())\n")
    common = lora_argv(
        v2_path,
        dataset,
        "--train",
        iters=6,
        batch_size=4,
        learning_rate="1e-3",
        steps_per_report=1,
        steps_per_eval=1000,
        save_every=6,
    )
    one = subprocess.run(
        [sys.executable, str(script), *common, "--adapter-path", str(tmp_path / "one")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    two = subprocess.run(
        [
            str(launcher),
            "-n",
            "2",
            "--backend",
            "ring",
            "--python",
            sys.executable,
            str(script),
            *common,
            "--adapter-path",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0 and two.returncode == 0, one.stdout + one.stderr + two.stdout + two.stderr

    def curve(text):
        return _losses(text.splitlines())

    assert len(curve(one.stdout)) == 6 and len(curve(two.stdout)) == 6  # reported once, by rank 0
    assert two.stdout.count("Trainable parameters:") == 1
    np.testing.assert_allclose(curve(two.stdout), curve(one.stdout), atol=2e-3)
    a, b = (
        mx.load(str(tmp_path / "one" / "adapters.safetensors")),
        mx.load(str(tmp_path / "two" / "adapters.safetensors")),
    )
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-4)


def test_gradient_checkpointing_gives_the_same_training(v2_path, dataset, tmp_path):
    """Run as subprocesses: checkpointing patches the decoder layer class for the whole process."""
    common = lora_argv(
        v2_path,
        dataset,
        "--train",
        iters=3,
        batch_size=4,
        learning_rate="1e-3",
        steps_per_report=1,
        steps_per_eval=1000,
    )
    runs = []
    for extra in ([], ["--grad-checkpoint"]):
        process = run_lora(*common, "--adapter-path", str(tmp_path / f"a{len(runs)}"), *extra)
        text = process.communicate(timeout=300)[0]
        assert process.returncode == 0, text
        runs.append(_losses(text.splitlines()))
    assert len(runs[0]) == 3
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-4)


def test_fuse_writes_a_16_bit_base_back_in_16_bits(v2_path, dataset, tmp_path):
    """A CPU computes a float16 model in float32 (loading.compute_dtype); the fused model is stored as float16."""
    from mlx_eve.conversion import convert
    from mlx_eve.fusion import fuse

    fp16 = convert(str(v2_path), tmp_path / "fp16", dtype="float16")
    assert lora_main(lora_argv(fp16, dataset, "--train", iters=2, batch_size=4, adapter_path=tmp_path / "a")) == 0
    out = fuse(str(fp16), str(tmp_path / "a"), str(tmp_path / "fused"))
    assert {v.dtype for f in out.glob("*.safetensors") for v in mx.load(str(f)).values()} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def _readme_config() -> str:
    """The YAML example in README.md's Fine-tuning section, as it is written there."""
    section = (ROOT / "README.md").read_text().split("## Fine-tuning")[1].split("\n## ")[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return block


def test_the_readme_example_config_trains_with_typed_values(v2_path, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(_readme_config())
    (tmp_path / "my_data").mkdir()
    args = resolve_args(["-c", "config.yaml"])
    assert type(args.learning_rate) is float and args.learning_rate == 1e-4  # YAML alone reads 1e-4 as a string
    assert (args.model, args.train, args.data, args.iters, args.batch_size) == (
        "BAAI/EVE-7B-HD-v2.0",
        True,
        Path("my_data"),
        600,
        4,
    )
    assert (args.lr_schedule, args.warmup, args.max_size) == ("cosine", 20, 800)
    assert (args.lora_rank, args.lora_scale, args.lora_dropout) == (8, 20.0, 0.05)
    assert (
        resolve_args(["-c", "config.yaml", "--iters", "1000"]).iters == 1000
    )  # the command line wins, at the default too
    # The run itself, on the test model and data, for two steps.
    argv = lora_argv(v2_path, dataset, max_size=224, iters=2, warmup=0, adapter_path="out")
    assert lora_main(["-c", "config.yaml", *argv]) == 0
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (
        saved["learning_rate"] == 1e-4
        and saved["lora_parameters"]["dropout"] == 0.05
        and saved["lr_schedule"] == "cosine"
    )


# A bad value for each range-checked option, and what the flag and the YAML key both say about it.
BAD_VALUES = [
    ("--batch-size", "0", "expected an integer >= 1, got '0'"),
    ("--iters", "-5", "expected an integer >= 1, got '-5'"),
    ("--iters", "1.5", "expected an integer >= 1, got '1.5'"),
    ("--save-every", "0", "expected an integer >= 1, got '0'"),
    ("--steps-per-report", "0", "expected an integer >= 1, got '0'"),
    ("--steps-per-eval", "0", "expected an integer >= 1, got '0'"),
    ("--grad-accumulation-steps", "0", "expected an integer >= 1, got '0'"),
    ("--lora-rank", "0", "expected an integer >= 1, got '0'"),
    ("--max-seq-length", "0", "expected an integer >= 1, got '0'"),
    ("--learning-rate", "0", "expected a number > 0, got '0'"),
    ("--learning-rate", "fast", "expected a number > 0, got 'fast'"),
    ("--lora-dropout", "1", "expected a number in [0, 1), got '1'"),
    ("--lora-dropout", "-0.1", "expected a number in [0, 1), got '-0.1'"),
    ("--warmup", "-1", "expected an integer >= 0, got '-1'"),
    ("--max-size", "31", "expected an integer >= 32, got '31'"),
    ("--num-layers", "0", "expected an integer >= 1, or -1 for all, got '0'"),
    ("--num-layers", "-2", "expected an integer >= 1, or -1 for all, got '-2'"),
    ("--weight-decay", "-0.01", "expected a number >= 0, got '-0.01'"),
    ("--max-grad-norm", "0", "expected a number > 0, got '0'"),
    ("--optimizer", "sgd", "invalid choice: 'sgd'"),
    ("--data", "nowhere", "no such file or folder: nowhere"),
    ("--resume-adapter-file", "nowhere.safetensors", "no such file: nowhere.safetensors"),
]


@pytest.mark.parametrize("flag,value,message", BAD_VALUES)
def test_a_bad_value_is_refused_alike_as_a_flag_and_in_the_config(flag, value, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        resolve_args([flag, value])
    assert exited.value.code == 2 and f"error: argument {flag}: {message}" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(f"{flag[2:].replace('-', '_')}: {value}\n")
    assert lora_main(["-c", "config.yaml"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines()[0].startswith(
        f"error: config.yaml: {flag[2:].replace('-', '_')}: {message}"
    )
    assert len(captured.err.splitlines()) == 1


@pytest.mark.parametrize(
    "config,message",
    [
        ("train: 3\n", "train: expected true or false, got 3"),
        ("iters: [1, 2]\n", "iters: expected a single value, got [1, 2]"),
        ("lora_parameters:\n  dropout: 1.5\n", "lora_parameters.dropout: expected a number in [0, 1), got '1.5'"),
        (
            "colour: red\nlearning-rate: 1e-4\nlora_parameters: {rank: 8, alpha: 16}\n",
            "unknown option(s): colour, learning-rate, lora_parameters.alpha",
        ),
        ("lora_rank: 4\nlora_parameters: {rank: 8}\n", "lora_rank given both on its own and under lora_parameters"),
        ("config: other.yaml\n", "unknown option(s): config"),
        ("- iters: 5\n", "expected 'option: value' lines, not a list"),
        ("iters: [5\n", "not valid YAML at line 2"),
    ],
)
def test_a_bad_config_is_one_error_line(config, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(config)
    assert lora_main(["-c", "config.yaml"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: config.yaml: {message}")


def test_the_command_line_tool_refuses_a_bad_config_without_a_traceback(tmp_path):
    (tmp_path / "config.yaml").write_text("learning_rate: fast\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_eve.lora", "-c", "config.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: config.yaml: learning_rate: expected a number > 0, got 'fast'"]
    missing = subprocess.run(
        [sys.executable, "-m", "mlx_eve.lora", "-c", "nope.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.splitlines()[-1].endswith(
        "error: argument -c/--config: no such file: nope.yaml"
    )
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    "options,expected",
    [
        # warm-up from 1e-5 to the peak at update 2; the peak again at update 3, then a cosine over 6 updates
        # to 1e-4 at the last (9): 1e-4 + 0.5 * 9e-4 * (1 + cos(pi * (u - 3) / 6)).
        (
            {"lr_schedule": "cosine", "warmup": 2, "iters": 10},
            [(0, 1e-5), (1, 5.05e-4), (2, 1e-3), (3, 1e-3), (5, 7.75e-4), (6, 5.5e-4), (9, 1e-4)],
        ),
        ({"lr_schedule": "cosine", "iters": 7}, [(0, 1e-3), (3, 5.5e-4), (6, 1e-4)]),
        # 1e-3 - 9e-4 * u / 10, held at 1e-4 after the last update
        ({"lr_schedule": "linear", "iters": 11}, [(0, 1e-3), (5, 5.5e-4), (10, 1e-4), (20, 1e-4)]),
        ({"lr_schedule": "linear", "iters": 22, "grad_accumulation_steps": 2}, [(0, 1e-3), (5, 5.5e-4), (10, 1e-4)]),
        (
            {"lr_schedule": "constant", "warmup": 4, "iters": 100},
            [(0, 1e-5), (2, 5.05e-4), (4, 1e-3), (5, 1e-3), (99, 1e-3)],
        ),
    ],
)
def test_learning_rate_schedule(options, expected):
    schedule = learning_rate_schedule(_training_args(learning_rate=1e-3, **options))
    np.testing.assert_allclose([schedule(step).item() for step, _ in expected], [lr for _, lr in expected], rtol=1e-5)


def test_trainable_parameters_count_quantized_weights_at_their_real_size(v2_path, tmp_path):
    """QLoRA counts the same as LoRA on the floating-point model: every weight once, at its real size."""
    from mlx_eve.conversion import convert

    config = json.loads((v2_path / "config.json").read_text())
    D, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * D // config["num_attention_heads"]
    r = 4
    # rank r LoRA on (in, out) adds r * (in + out); q, k, v, o, gate, up, down, in both branches of every layer
    per_branch = r * ((D + D) + 2 * (D + kv) + (D + D) + 2 * (D + inner) + (inner + D))
    lora = 2 * per_branch * min(16, layers)
    float_model, _ = load(str(v2_path))
    weights = sum(v.size for _, v in tree_flatten(float_model.parameters()))
    q4 = convert(str(v2_path), tmp_path / "q4", quantize=True)
    for path in (v2_path, q4):
        model, _ = _lora(path, "both")
        assert parameter_counts(model) == (lora, weights + lora)
    full, _ = _lora(v2_path, "both", fine_tune_type="full")
    assert parameter_counts(full) == (weights, weights)
