"""The family table: a new family is one model file plus one record, and then loads, generates,
fine-tunes and converts like the built-in ones; the built-in records say what the reference says."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3
from PIL import Image

from mlx_eve import generate, load
from mlx_eve.commands.lora import main as lora_main
from mlx_eve.conversion import convert
from mlx_eve.errors import CheckpointError
from mlx_eve.families import FAMILIES, TEXT_LINEARS, Family, family_of, register
from mlx_eve.image_processing import AnyPixelProcessor, AnyRatioProcessor
from mlx_eve.prompts import TEMPLATES

TOY = Family(
    model_type="eve-qwen3-toy",
    name="EVE-Qwen3 (toy)",
    module="toy_family",  # tests/toy_family.py
    image_processor=AnyRatioProcessor,
    template=TEMPLATES["qwen2"],
    lora_targets={"decoder": TEXT_LINEARS},
    patch_embedding=("vision_tower",),
    text_model="qwen3",
)
TOY_CONFIG = {
    "model_type": TOY.model_type,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "vocab_size": 403,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "mm_hidden_size": 32,
    "torch_dtype": "float32",
}
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
]


@pytest.fixture
def toy_family():
    register(TOY)
    yield TOY
    FAMILIES.pop(TOY.model_type)


@pytest.fixture
def toy_checkpoint(toy_family, v2_path, tmp_path):
    """A random toy checkpoint: config, one safetensors file, the tiny EVEv2 BPE tokenizer, a preprocessor."""
    import toy_family as module

    folder = tmp_path / "toy"
    folder.mkdir()
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(TOY_CONFIG))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(TOY_CONFIG))
    preprocessor = {"image_processor_type": "AnyRatioProcessor", "max_size": 64, "patch_stride": 16, "dense_stride": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    for name in TOKENIZER_FILES:
        shutil.copy(v2_path / name, folder / name)
    return folder


def test_a_new_family_loads_generates_fine_tunes_and_converts(toy_checkpoint, tmp_path, images):
    import toy_family as module

    model, processor = load(str(toy_checkpoint))
    assert isinstance(model, module.Model) and processor.template is TEMPLATES["qwen2"]
    assert isinstance(processor.image_processor, AnyRatioProcessor) and processor.image_processor.max_size == 64

    # Its text decoder is mlx-lm's Qwen3, run by mlx-lm itself on the same weights.
    qwen = qwen3.Model(qwen3.ModelArgs.from_dict({**TOY_CONFIG, "model_type": "qwen3"}))
    qwen.load_weights([(k, v) for k, v in tree_flatten(model.parameters()) if ".vision_tower." not in k])
    ids = mx.array([[5, 17, 42, 99, 3]])
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(qwen(ids)), atol=1e-5)

    answer = generate(model, processor, "What is in the image?", image=images["wide"], max_tokens=4)
    assert isinstance(answer, str)

    # LoRA on its decoder, with the patch embedding; the adapters load back.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("wide", "tall"):
        Image.open(images[name]).save(data / f"{name}.png")

    def record(name, colour):
        return {
            "image": f"{name}.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": colour}],
        }

    lines = [record("wide", "red"), record("tall", "blue")] * 2
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    adapters = tmp_path / "adapters"
    common = ["--model", str(toy_checkpoint), "--train", "--data", str(data), "--adapter-path", str(adapters)]
    assert lora_main([*common, "--targets", "visual"]) == 1  # the toy has no visual branch
    argv = [
        *common,
        "--iters",
        "3",
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--learning-rate",
        "1e-3",
        "--train-patch-embedding",
    ]
    assert lora_main(argv) == 0
    saved = json.loads((adapters / "adapter_config.json").read_text())
    assert saved["targets"] == "decoder" and saved["lora_parameters"]["keys"] == list(TEXT_LINEARS)
    tuned, _ = load(str(toy_checkpoint), adapter_path=str(adapters))
    lora_layers = [p for p, m in tuned.named_modules() if type(m).__name__ == "LoRALinear"]
    assert len(lora_layers) == 2 * len(TEXT_LINEARS)
    trained = dict(tree_flatten(tuned.parameters()))["model.vision_tower.split_embedding"]
    assert not np.array_equal(
        np.asarray(trained), np.asarray(dict(tree_flatten(model.parameters()))["model.vision_tower.split_embedding"])
    )

    # 8-bit conversion: every decoder linear and the (tied) embedding quantized, the patch embedding kept.
    out = convert(str(toy_checkpoint), tmp_path / "toy-8bit", quantize=True, q_bits=8, q_group_size=32)
    quantized, _ = load(str(out))
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    paths = {p for p, m in quantized.named_modules() if isinstance(m, kinds)}
    expected = {f"model.layers.{i}.{key}" for i in range(2) for key in TEXT_LINEARS} | {"model.embed_tokens"}
    assert paths == expected
    reference, converted = np.asarray(model(ids)), np.asarray(quantized(ids))
    assert np.linalg.norm(converted - reference) / np.linalg.norm(reference) < 0.05


def test_the_built_in_records_follow_the_reference():
    v1, v2 = family_of("eve"), family_of("eve-qwen2")
    assert (v1.name, v1.image_processor, v1.template.name, v1.text_model) == (
        "EVEv1",
        AnyPixelProcessor,
        "vicuna_v1",
        "llama",
    )
    assert (v2.name, v2.image_processor, v2.template.name, v2.text_model) == (
        "EVEv2",
        AnyRatioProcessor,
        "qwen2",
        "qwen2",
    )
    assert v1.default_targets == "decoder" and v2.default_targets == "both"
    assert set(v2.lora_targets["both"]) == set(v2.lora_targets["text"]) | set(v2.lora_targets["visual"])
    assert all(key.split(".")[-1].startswith("moe_") or key.startswith("moe_") for key in v2.lora_targets["visual"])
    assert v1.is_patch_embedding("model.mm_projector.0.weight") and v1.is_patch_embedding(
        "model.vision_tower.class_embedding"
    )
    assert not v2.is_patch_embedding("model.mm_projector.0.weight") and not v2.is_patch_embedding(
        "model.vision_towers.x"
    )
    with pytest.raises(CheckpointError, match="Unknown model_type 'llava'.*'eve', 'eve-qwen2'"):
        family_of("llava")
