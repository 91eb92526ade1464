"""Apply saved adapters (mlx-lm's ``adapter_config.json`` + ``adapters.safetensors``) to an EVE model."""

import json
from pathlib import Path
from typing import Union

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from .errors import CheckpointError
from .models.base import EVEModel

ADAPTER_LEAVES = {"lora_a", "lora_b", "m"}
# Trained whole next to LoRA by --train-patch-embedding (mlx-lm's own loader only accepts LoRA leaves).
PATCH_EMBEDDING_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def load_adapters(model: EVEModel, adapter_path: Union[str, Path]) -> EVEModel:
    """Turn the adapted layers into LoRA/DoRA layers and load the saved weights, checking every name and shape."""
    adapter_path = Path(adapter_path)
    config_file, weights_file = adapter_path / "adapter_config.json", adapter_path / "adapters.safetensors"
    for required in (config_file, weights_file):
        if not required.is_file():
            raise CheckpointError(f"No {required.name} in the adapter folder {adapter_path}.")
    config = json.loads(config_file.read_text())
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "full":
        linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=fine_tune_type == "dora")
    params = dict(tree_flatten(model.parameters()))

    def trainable(name: str) -> bool:
        if fine_tune_type == "full" or name.rsplit(".", 1)[-1] in ADAPTER_LEAVES:
            return True
        return bool(config.get("train_patch_embedding")) and name.startswith(PATCH_EMBEDDING_PREFIXES)

    weights = mx.load(str(weights_file))
    errors = []
    for name, w in weights.items():
        if name not in params or not trainable(name):
            errors.append(f"  {name}: not a parameter these adapters train")
        elif w.shape != params[name].shape:
            errors.append(f"  {name}: shape {tuple(w.shape)} in the adapters, {tuple(params[name].shape)} in the model")
    if errors:
        raise CheckpointError(f"The adapters in {adapter_path} do not fit this model:\n" + "\n".join(errors))
    model.load_weights([(name, w.astype(params[name].dtype)) for name, w in weights.items()], strict=False)
    return model
