"""convert: original checkpoints → MLX (float, 4/8-bit, mixed), what the output holds, and failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_eve.conversion as convert_module
from mlx_eve import load, stream_generate
from mlx_eve.conversion import ConvertError, convert
from mlx_eve.errors import CheckpointError
from mlx_eve.saving import OutputExistsError, write_model_card
from mlx_eve.shard_writer import ShardWriter

ROOT = Path(__file__).resolve().parent.parent


def last_logits(model, processor, image, question="What is in the image?"):
    inputs = processor(question, images=[image])
    embeddings = model.embed_inputs(inputs.input_ids, inputs.pixel_values)
    return np.asarray(model(inputs.input_ids[None], input_embeddings=embeddings[None])[0].astype(mx.float32))


def greedy_tokens(model, processor, image, n=12):
    return [r.token for r in stream_generate(model, processor, "Describe the image.", image=image, max_tokens=n)]


@pytest.fixture(scope="module")
def sources(checkpoints):
    pre = {"max_size": 224, "patch_stride": 16, "dense_stride": 2}
    return {
        "v1": checkpoints("v1", "v1"),
        "v2": checkpoints("v2", "v2", preprocessor=pre),
        "v1-bin": checkpoints("v1-bin", "v1", fmt="bin"),
        "v2-bin": checkpoints("v2-bin", "v2", fmt="bin", preprocessor=pre),
    }


@pytest.mark.parametrize("source", ["v1", "v2", "v1-bin", "v2-bin"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float_round_trip(sources, tmp_path, images, source, dtype):
    out = convert(str(sources[source]), tmp_path / "mlx", dtype=dtype)
    stored = {v.dtype for f in out.glob("*.safetensors") for v in mx.load(str(f)).values()}
    assert stored == {getattr(mx, dtype)}
    model, processor = load(str(out), dtype=getattr(mx, dtype))  # computed in half precision
    assert all(v.dtype == getattr(mx, dtype) for _, v in nn.utils.tree_flatten(model.parameters()))
    reference, _ = load(str(sources[source]))
    a, b = last_logits(reference, processor, images["wide"]), last_logits(model, processor, images["wide"])
    assert np.abs(a - b).max() < (0.1 if dtype == "float16" else 0.5)  # half precision rounding only
    assert len(greedy_tokens(model, processor, images["wide"], 4)) == 4


def _quantized_layers(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


@pytest.mark.parametrize("source", ["v1", "v2-bin"])
def test_quantization_covers_both_branches_and_keeps_the_patch_embedding_float(sources, tmp_path, source):
    out = convert(str(sources[source]), tmp_path / "q4", quantize=True, q_bits=4)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    model, _ = load(str(out))
    quantized = _quantized_layers(model)
    linears = [
        p
        for p, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding))
    ]
    decoder = [p for p in linears if not p.startswith(("model.vision_tower", "model.mm_projector"))]
    assert sorted(quantized) == sorted(decoder)
    assert "model.embed_tokens" in quantized and "lm_head" in quantized
    if source.startswith("v2"):
        assert {"model.layers.0.self_attn.moe_q_proj", "model.layers.1.moe_mlp.down_proj"} <= quantized.keys()
    vision = {
        k: v
        for k, v in nn.utils.tree_flatten(model.parameters())
        if k.startswith(("model.vision_tower", "model.mm_projector"))
    }
    assert vision and all(mx.issubdtype(v.dtype, mx.floating) for v in vision.values())
    assert not any(k.endswith(("scales", "biases")) for k in vision)


def test_8bit_matches_float_and_4bit_stays_close(sources, tmp_path, images):
    """Relative L2 error of the logits over an image prompt. Affine quantization rounds each weight to one
    of 2**bits levels spanning its group of 64: 8-bit leaves ~1% error on this tiny random model (we
    allow 3%, and require the same greedy answer); 4-bit leaves ~19% (we allow 25%). A random model has
    near-flat logits, so top-1 agreement is a poor measure at 4 bits; the error norm is what we bound."""
    reference, processor = load(str(sources["v2"]))
    float_logits = last_logits(reference, processor, images["wide"])

    def relative_error(bits):
        model, _ = load(str(convert(str(sources["v2"]), tmp_path / f"q{bits}", quantize=True, q_bits=bits)))
        logits = last_logits(model, processor, images["wide"])
        return model, np.linalg.norm(logits - float_logits) / np.linalg.norm(float_logits)

    q8, error8 = relative_error(8)
    assert error8 < 0.03
    assert greedy_tokens(q8, processor, images["wide"]) == greedy_tokens(reference, processor, images["wide"])
    _, error4 = relative_error(4)
    assert error8 < error4 < 0.25


def test_mixed_recipe_records_per_layer_bits(checkpoints, tmp_path, images):
    deep = checkpoints("v2-8-layers", "v2", num_hidden_layers=8, preprocessor={"max_size": 224})
    out = convert(str(deep), tmp_path / "mixed", quantize=True, quant_predicate="mixed_3_6", q_group_size=32)
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["bits"] == 3 and config["lm_head"] == {"group_size": 32, "bits": 6, "mode": "affine"}
    model, processor = load(str(out))
    bits = {path: m.bits for path, m in _quantized_layers(model).items()}
    # mlx-lm's recipe on 8 layers: 6 bits for the head, and for v_proj and down_proj of layers 0 and 7 (the
    # first and last eighth) and of every third layer from 1 + 2 (3, 6); in both EVEv2 branches. 3 bits elsewhere.
    high = {
        f"model.layers.{i}.{m}"
        for i in (0, 3, 6, 7)
        for m in ("self_attn.v_proj", "self_attn.moe_v_proj", "mlp.down_proj", "moe_mlp.down_proj")
    }
    assert {path for path, b in bits.items() if b == 6} == high | {"lm_head"}
    assert {b for path, b in bits.items() if path not in high | {"lm_head"}} == {3}
    assert "model.embed_tokens" in bits and not any(".vision_tower" in path for path in bits)
    assert len(greedy_tokens(model, processor, images["wide"], 3)) == 3


def test_dequantize_restores_a_float_model(sources, tmp_path, images):
    q8 = convert(str(sources["v1"]), tmp_path / "q8", quantize=True, q_bits=8)
    restored = convert(str(q8), tmp_path / "restored", dequantize=True)
    assert "quantization" not in json.loads((restored / "config.json").read_text())
    quantized, processor = load(str(q8))
    model, _ = load(str(restored))
    assert not _quantized_layers(model)
    # Dequantized weights are exactly what the quantized matmuls use.
    np.testing.assert_allclose(
        last_logits(model, processor, images["tall"]), last_logits(quantized, processor, images["tall"]), atol=1e-4
    )
    with pytest.raises(ConvertError, match="already quantized"):
        convert(str(q8), tmp_path / "again", quantize=True)
    with pytest.raises(ConvertError, match="nothing to dequantize"):
        convert(str(sources["v1"]), tmp_path / "nothing", dequantize=True)


def test_output_layout_and_model_card(sources, tmp_path, monkeypatch):
    out = convert(
        str(sources["v1-bin"]), tmp_path / "sharded", max_shard_gb=1e-4, command="python convert.py --hf-path x"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(v.nbytes for f in shards for v in mx.load(str(out / f)).values())
    for name in [
        "config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "README.md",
    ]:
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "library_name: mlx" in card and "python convert.py --hf-path x" in card
    # A local source is named, not linked or declared as the hub's base_model; a repo id is both.
    assert f"`{sources['v1-bin']}`" in card and "base_model:" not in card and "huggingface.co" not in card
    write_model_card(tmp_path, "BAAI/EVE-7B-HD-v1.0", "python convert.py", "4-bit")
    card = (tmp_path / "README.md").read_text()
    assert "base_model: BAAI/EVE-7B-HD-v1.0\n" in card and "(https://huggingface.co/BAAI/EVE-7B-HD-v1.0)" in card
    (tmp_path / "README.md").unlink()
    assert json.loads((out / "preprocessor_config.json").read_text())["image_size"] == 672
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_refuses_to_overwrite_unless_forced(sources, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(str(sources["v2"]), target)
    # --force replaces model folders only: a folder of other files is kept.
    with pytest.raises(OutputExistsError, match="not a model folder"):
        convert(str(sources["v2"]), target, force=True)
    assert (target / "keep.txt").read_text() == "user data"
    (target / "keep.txt").unlink()
    convert(str(sources["v2"]), target, quantize=True)
    convert(str(sources["v2"]), target, force=True)
    assert "quantization" not in json.loads((target / "config.json").read_text())


@pytest.mark.parametrize("where", ["the source", "its parent"])
def test_force_never_replaces_the_source_or_a_folder_holding_it(sources, tmp_path, where):
    import shutil

    parent = tmp_path / "models"
    source = parent / "eve"
    shutil.copytree(sources["v2"], source)
    (parent / "config.json").write_text("{}")  # even when the folder above looks like a model folder
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = source if where == "the source" else parent
    with pytest.raises(OutputExistsError, match="which this command reads"):
        convert(str(source), out, quantize=True, force=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_failure_mid_conversion_leaves_nothing_that_looks_finished(sources, tmp_path, monkeypatch):
    original = ShardWriter.write
    written = []

    def flaky(self, name, array):
        written.append(name)
        if len(written) == 5:
            raise KeyboardInterrupt
        original(self, name, array)

    monkeypatch.setattr(ShardWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(str(sources["v2"]), tmp_path / "out", quantize=True)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_conversion_leaves_only_a_hidden_incomplete_folder(sources, tmp_path):
    script = (
        "import os, sys\n"
        "import mlx_eve.conversion as c\n"
        "from mlx_eve.shard_writer import ShardWriter\n"
        "write = ShardWriter.write\n"
        "count = [0]\n"
        "def dying(self, name, array):\n"
        "    count[0] += 1\n"
        "    if count[0] == 5: os._exit(9)\n"
        "    write(self, name, array)\n"
        "ShardWriter.write = dying\n"
        f"c.convert({str(sources['v1'])!r}, {str(tmp_path / 'out')!r}, quantize=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 9
    leftovers = list(tmp_path.iterdir())
    assert not (tmp_path / "out").exists()
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.incomplete-")
    assert not (leftovers[0] / "config.json").exists()
    # The next run clears what the killed one left (its process is gone), and finishes.
    convert(str(sources["v1"]), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_model_moved_aside_by_a_killed_run_is_put_back(sources, tmp_path):
    import shutil

    from mlx_eve.saving import staged_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    shutil.copytree(sources["v2"], tmp_path / f".out.replaced-{int(dead.stdout)}")  # killed mid-swap: no "out"
    with pytest.raises(OutputExistsError, match="already exists"), staged_folder(tmp_path / "out"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "config.json").exists()


def test_checkpoint_problems_are_reported_before_writing(sources, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sources["v2"], broken)
    shard = broken / "model-00001-of-00002.safetensors"
    weights = dict(mx.load(str(shard)))
    missing = next(k for k in weights if k.endswith("moe_mlp.gate_proj.weight"))
    weights.pop(missing)
    mx.save_safetensors(str(shard), weights)
    with pytest.raises(CheckpointError, match=f"1 missing: {missing}"):
        convert(str(broken), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(
        convert_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)
    )
    with pytest.raises(ConvertError, match="Not enough disk space"):
        convert(str(sources["v2"]), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_upload_builds_the_repo_from_the_finished_folder(sources, tmp_path, monkeypatch):
    import huggingface_hub

    uploads, online = [], []

    class FakeApi:
        def whoami(self):
            if not online:
                raise ConnectionError("Cannot reach https://huggingface.co")
            return {"name": "me"}

        def create_repo(self, repo_id, exist_ok=False):
            uploads.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, repo_type):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            uploads.append(("upload", repo_id, repo_type, files, (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for repo, message in (
        ("not a repo id", "is not a Hugging Face repo id"),
        ("me/offline", "Cannot upload to me/offline"),
    ):
        with pytest.raises(ConvertError, match=message):  # before anything is read or written
            convert(str(sources["v2"]), tmp_path / "out", quantize=True, upload_repo=repo)
        assert not list(tmp_path.iterdir())
    online.append(True)
    convert(str(sources["v2"]), tmp_path / "out", quantize=True, upload_repo="me/eve-tiny-4bit")
    assert uploads[0] == ("create", "me/eve-tiny-4bit")
    _, repo, kind, files, card = uploads[1]
    assert repo == "me/eve-tiny-4bit" and kind == "model"
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "README.md"} <= set(
        files
    )
    assert "--model me/eve-tiny-4bit" in card


def test_cli(sources, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "convert.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )

    result = run("--hf-path", str(sources["v2"]), "--mlx-path", str(tmp_path / "q8"), "-q", "--q-bits", "8")
    assert result.returncode == 0, result.stderr
    assert "bits per weight" in result.stdout
    assert "python convert.py --hf-path" in (tmp_path / "q8" / "README.md").read_text()
    again = run("--hf-path", str(sources["v2"]), "--mlx-path", str(tmp_path / "q8"))
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    module = subprocess.run(
        [sys.executable, "-m", "mlx_eve.convert", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert module.returncode == 0 and "--quant-predicate" in module.stdout
    assert os.path.exists(tmp_path / "q8" / "model.safetensors")
