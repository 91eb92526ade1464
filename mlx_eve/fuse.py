"""Merge trained adapters into the model and save it as a model folder that loads without them.

python -m mlx_eve.fuse --model BAAI/EVE-7B-HD-v2.0 --adapter-path adapters --save-path eve-fused
"""

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model

from .arguments import ArgumentParser
from .convert import check_upload, upload_to_hub
from .errors import run_cli
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


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(description="Merge LoRA/DoRA adapters (or full fine-tuned weights) into an EVE model.")
    p.add_argument("--model", required=True, help="The base model the adapters were trained on.")
    p.add_argument(
        "--adapter-path", default="adapters", help="Folder with adapter_config.json and adapters.safetensors."
    )
    p.add_argument("--save-path", default="fused_model", help="Where to write the fused model.")
    p.add_argument("--dequantize", action="store_true", help="Write a floating-point model from a quantized base.")
    p.add_argument("--force", action="store_true", help="Replace an existing, non-empty --save-path.")
    p.add_argument("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "mlx_eve.fuse", *(sys.argv[1:] if argv is None else argv)])
    return run_cli(
        lambda: fuse(
            args.model, args.adapter_path, args.save_path, args.dequantize, args.force, args.upload_repo, command
        )
    )


if __name__ == "__main__":
    sys.exit(main())
