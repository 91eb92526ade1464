"""Merging trained adapters into the model, saved as a model folder that loads without them."""

import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model

from .conversion import check_upload, upload_to_hub
from .loading import get_model_path, load, read_config
from .saving import check_output, save_model


def fuse(
    model_path: str,
    adapter_path: str,
    save_path: str,
    dequantize: bool = False,
    force: bool = False,
    upload_repo: Optional[str] = None,
    command: Optional[str] = None,
) -> Path:
    keep = [Path(model_path), Path(adapter_path)]
    check_output(Path(save_path), force, keep)
    if upload_repo is not None:
        check_upload(upload_repo)
    model, processor = load(model_path, adapter_path=adapter_path)
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    if quantized and not dequantize:
        print(
            "[WARNING] The base model is quantized: the merged layers are quantized again, which rounds away "
            "part of what the adapters learned. Pass --dequantize for a floating-point model.",
            file=sys.stderr,
        )
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    source = get_model_path(model_path)
    config = read_config(source)
    stored = config.get("torch_dtype")
    if stored in ("float16", "bfloat16"):  # a CPU loads 16-bit weights as float32 (cpu.compute_dtype)
        model.set_dtype(getattr(mx, stored))
    command = command or f"python -m mlx_eve.fuse --model {model_path} --adapter-path {adapter_path}"
    out = save_model(model, processor, config, Path(save_path), model_path, command, force, [source, *keep])
    print(f"[INFO] Saved the fused model to {out}")
    if upload_repo is not None:
        upload_to_hub(out, upload_repo)
    return out
