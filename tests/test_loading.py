"""Loading original and MLX checkpoints, and every way a checkpoint can be wrong."""

import datetime
import json
import shutil
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_eve import load
from mlx_eve.errors import CheckpointError, MissingDependencyError, ModelNotFoundError
from mlx_eve.loading import read_weights


def logits_for(model, processor, image):
    """Logits at every position of an image prompt."""
    inputs = processor("What is it?", images=[image])
    embeddings = model.embed_inputs(inputs.input_ids, inputs.pixel_values)
    return np.asarray(model(inputs.input_ids[None], input_embeddings=embeddings[None])[0].astype(mx.float32))


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_sanitize_drops_training_keys_fixes_convs_and_is_idempotent(family, v1_model, v2_model, v1_path, v2_path):
    model, _ = v1_model if family == "v1" else v2_model
    raw = read_weights(v1_path if family == "v1" else v2_path)
    once = model.sanitize(dict(raw))
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys() and all(mx.array_equal(once[k], twice[k]) for k in once)
    assert not any(k.startswith(("model.vision_clip.", "model.vision_tower_compressor.")) for k in once)
    assert not any("rotary_emb" in k for k in once)
    if family == "v1":
        assert raw["model.vision_clip.vision_model.embeddings.class_embedding"] is not None
        assert raw["model.vision_tower.patch_embedding.weight"].shape == (32, 3, 14, 14)
        assert once["model.vision_tower.patch_embedding.weight"].shape == (32, 14, 14, 3)
    else:
        assert once["model.vision_tower.patch_embedding.2.weight"].shape == (64, 2, 2, 32)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_sharded_bin_checkpoint_equals_safetensors(family, checkpoints, v1_model, v2_model, images):
    model, processor = v1_model if family == "v1" else v2_model
    pre = None if family == "v1" else {"max_size": 224, "patch_stride": 16, "dense_stride": 2}
    bin_path = checkpoints(f"{family}-bin", family, fmt="bin", preprocessor=pre)
    assert sorted(p.name for p in bin_path.glob("pytorch_model*")) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    from_bin, _ = load(str(bin_path))
    np.testing.assert_array_equal(
        logits_for(from_bin, processor, images["wide"]), logits_for(model, processor, images["wide"])
    )


def test_bfloat16_bin_checkpoint(checkpoints, images):
    path = checkpoints("v2-bin-bf16", "v2", fmt="bin", dtype="bfloat16")
    model, processor = load(str(path), dtype=mx.bfloat16)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    reference = torch.load(path / "pytorch_model-00001-of-00002.bin", weights_only=True)
    key = next(k for k in reference if k.endswith("mlp.up_proj.weight"))
    ours = dict(tree_flatten(model.parameters()))[key]
    np.testing.assert_array_equal(np.asarray(ours.astype(mx.float32)), reference[key].float().numpy())


def test_a_cpu_computes_16_bit_checkpoints_in_float32(checkpoints):
    """MLX's CPU backend emulates half precision (about 10x slower); the weights' values are kept."""
    path = checkpoints("v2-bin-bf16", "v2", fmt="bin", dtype="bfloat16")
    stored, _ = load(str(path), dtype=mx.bfloat16)
    model, _ = load(str(path))
    assert mx.default_device() == mx.cpu
    for (key, ours), (_, kept) in zip(tree_flatten(model.parameters()), tree_flatten(stored.parameters())):
        assert ours.dtype == mx.float32, key
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(kept.astype(mx.float32)))


def _copy(path, tmp_path):
    target = tmp_path / path.name
    shutil.copytree(path, target)
    return target


def _edit_weights(path, edit):
    """Apply ``edit(dict)`` to the first safetensors shard."""
    shard = sorted(path.glob("model-*.safetensors"))[0]
    weights = dict(mx.load(str(shard)))
    edit(weights)
    mx.save_safetensors(str(shard), weights)
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in weights or v != shard.name}
    data["weight_map"].update({k: shard.name for k in weights})
    index.write_text(json.dumps(data))
    return sorted(weights)


def test_missing_unexpected_and_misshaped_weights_are_named(v2_path, tmp_path):
    path = _copy(v2_path, tmp_path)
    keys = _edit_weights(path, lambda w: None)
    victim = next(k for k in keys if "moe_mlp.up_proj" in k)
    misshaped = next(k for k in keys if k.endswith("input_layernorm.weight"))

    def edit(w):
        w.pop(victim)
        w["model.layers.0.self_attn.extra_proj.weight"] = mx.zeros((4, 4))
        w[misshaped] = mx.zeros((63,))

    _edit_weights(path, edit)
    with pytest.raises(CheckpointError) as error:
        load(str(path))
    message = str(error.value)
    assert f"1 missing: {victim}" in message
    assert "1 unexpected: model.layers.0.self_attn.extra_proj.weight" in message
    assert f"{misshaped} (checkpoint (63,), model (64,))" in message


def test_missing_shard_config_and_unknown_type(v1_path, tmp_path):
    path = _copy(v1_path, tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        load(str(path))
    for f in path.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="No weights"):
        load(str(path))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ValueError, match="Unknown model_type 'llava'.*'eve', 'eve-qwen2'"):
        load(str(path))
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(str(path))
    with pytest.raises(ModelNotFoundError, match="not found"):
        load(str(tmp_path / "does" / "not" / "exist"))


def test_bin_without_torch_is_a_clear_error(checkpoints, monkeypatch):
    path = checkpoints("v1-bin", "v1", fmt="bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'mlx-eve\[torch\]'"):
        load(str(path))


def test_bin_with_pickled_objects_is_refused(v1_path, tmp_path):
    path = _copy(v1_path, tmp_path)
    for f in path.glob("model*"):
        f.unlink()
    torch.save({"model.norm.weight": torch.ones(64), "payload": datetime.datetime.now()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load(str(path))


def test_hub_repo_ids_download_the_right_files(v2_path, monkeypatch):
    import huggingface_hub

    calls = []
    files = [SimpleNamespace(rfilename=f) for f in ("config.json", "model.safetensors", "tokenizer.json")]
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, revision=None: SimpleNamespace(siblings=files))

    def fake_snapshot(repo, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo, allow_patterns))
        return str(v2_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model, processor = load("BAAI/EVE-7B-HD-v2.0")
    assert calls[0][0] == "BAAI/EVE-7B-HD-v2.0"
    assert "*.safetensors" in calls[0][1] and "*.bin" not in calls[0][1] and "tokenizer.model" in calls[0][1]


def test_lora_adapters_load(v2_path, tmp_path, images):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, processor = load(str(v2_path))
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.moe_q_proj"]}
    linear_to_lora_layers(model, 1, params)
    # Only the visual copy gets a non-zero update: it changes the image positions' outputs.
    model.layers[-1].self_attn.moe_q_proj.lora_b = mx.ones_like(model.layers[-1].self_attn.moe_q_proj.lora_b) * 0.1
    adapters = dict(t for t in tree_flatten(model.trainable_parameters()) if "lora" in t[0])
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), adapters)
    config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    expected = logits_for(model, processor, images["wide"])
    adapted, _ = load(str(v2_path), adapter_path=str(tmp_path))
    base, _ = load(str(v2_path))
    np.testing.assert_allclose(logits_for(adapted, processor, images["wide"]), expected, atol=1e-5)
    assert np.abs(logits_for(base, processor, images["wide"]) - expected).max() > 1e-3
