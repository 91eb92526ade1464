"""The ``fuse`` command: merge trained adapters into the model (``mlx_eve.fusion``).

python -m mlx_eve.fuse --model BAAI/EVE-7B-HD-v2.0 --adapter-path adapters --save-path eve-fused
"""

import argparse
import shlex
import sys
from typing import List, Optional

from ..arguments import ArgumentParser
from ..errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Merge LoRA/DoRA adapters (or full fine-tuned weights) into an EVE model.")
    p.add_argument("--model", required=True, help="The base model the adapters were trained on.")
    p.add_argument(
        "--adapter-path", default="adapters", help="Folder with adapter_config.json and adapters.safetensors."
    )
    p.add_argument("--save-path", default="fused_model", help="Where to write the fused model.")
    p.add_argument("--dequantize", action="store_true", help="Write a floating-point model from a quantized base.")
    p.add_argument("--force", action="store_true", help="Replace an existing, non-empty --save-path.")
    p.add_argument("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    from ..fusion import fuse

    command = shlex.join(["python", "-m", "mlx_eve.fuse", *(sys.argv[1:] if argv is None else argv)])
    return run_cli(
        lambda: fuse(
            args.model, args.adapter_path, args.save_path, args.dequantize, args.force, args.upload_repo, command
        )
    )
