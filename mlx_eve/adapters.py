"""Apply saved adapters (mlx-lm's ``adapter_config.json`` + ``adapters.safetensors``) to an EVE model."""

import json
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from .errors import CheckpointError, EVEError
from .models.base import EVEModel


def make_trainable(model: EVEModel, config: dict) -> None:
    """Freeze the model and leave trainable exactly what the adapters of ``config`` train: new LoRA/DoRA
    layers, plus the patch embedding with ``train_patch_embedding``; or, for full fine-tuning, everything
    (the patch embedding too unless ``freeze_patch_embedding``)."""
    model.freeze()
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        model.unfreeze()
    else:
        # More layers than the model has (e.g. the default 16 on a small model) means all of them.
        linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=fine_tune_type == "dora")
    for module in model.family.patch_embedding_modules(model):
        if config.get("train_patch_embedding"):
            module.unfreeze()
        elif config.get("freeze_patch_embedding"):
            module.freeze()


def load_adapters(model: EVEModel, adapter_path: Union[str, Path]) -> EVEModel:
    """Make the model as it was trained (see ``make_trainable``) and load the saved weights, checking every
    name and shape: mlx-lm's own loader refuses the patch embedding that ``--train-patch-embedding`` saves."""
    adapter_path = Path(adapter_path)
    config_file, weights_file = adapter_path / "adapter_config.json", adapter_path / "adapters.safetensors"
    for required in (config_file, weights_file):
        if not required.is_file():
            raise CheckpointError(f"No {required.name} in the adapter folder {adapter_path}.")
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON object was expected, not a {type(config).__name__}")
        make_trainable(model, config)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not a valid adapter configuration: {e!s}") from e
    trained = dict(tree_flatten(model.trainable_parameters()))
    try:
        weights = mx.load(str(weights_file))
    except Exception as e:  # MLX reports a truncated or foreign file as a RuntimeError or ValueError
        raise CheckpointError(f"Could not read {weights_file}: {e}") from e
    errors = [f"  {name}: missing from the adapters" for name in sorted(trained.keys() - weights.keys())]
    for name, w in weights.items():
        if name not in trained:
            errors.append(f"  {name}: not a parameter these adapters train")
        elif w.shape != trained[name].shape:
            errors.append(
                f"  {name}: shape {tuple(w.shape)} in the adapters, {tuple(trained[name].shape)} in the model"
            )
    if errors:
        raise CheckpointError(f"The adapters in {adapter_path} do not fit this model:\n" + "\n".join(errors))
    model.load_weights([(name, w.astype(trained[name].dtype)) for name, w in weights.items()], strict=False)
    return model


def prepare_model(model: EVEModel, config: dict) -> None:
    """Freeze the model and make exactly the chosen parameters trainable (LoRA weights drawn from the seed)."""
    mx.random.seed(config["seed"])
    if config["fine_tune_type"] == "full" and any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    ):
        raise EVEError("Full fine-tuning needs a floating-point model; use LoRA (QLoRA) on a quantized one.")
    if config.get("freeze_patch_embedding") and (config["fine_tune_type"] != "full" or config["train_patch_embedding"]):
        raise EVEError(
            "--freeze-patch-embedding goes with --fine-tune-type full, and not with --train-patch-embedding."
        )
    trains_patch_embedding = config["train_patch_embedding"] or (
        config["fine_tune_type"] == "full" and not config.get("freeze_patch_embedding")
    )
    if config.get("patch_embedding_lr_scale", 1.0) != 1.0 and not trains_patch_embedding:
        raise EVEError(
            "--patch-embedding-lr-scale needs a trained patch embedding (--train-patch-embedding or full fine-tuning)."
        )
    make_trainable(model, config)
