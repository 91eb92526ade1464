"""LoRA adapters as training first makes them (B = 0, so they change no answer), saved as training saves them."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_eve import load
from mlx_eve.adapters import make_trainable
from mlx_eve.families import TEXT_LINEARS


def write_zero_adapters(model_path: Path, folder: Path, num_layers: int = 2) -> Path:
    """Adapters of the model at ``model_path`` on the text branch of its last ``num_layers`` layers, in ``folder``."""
    model, _ = load(str(model_path))
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": list(TEXT_LINEARS)},
    }
    make_trainable(model, config)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    return folder
