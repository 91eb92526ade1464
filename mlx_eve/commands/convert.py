"""The ``convert`` command: an original EVE checkpoint (Hugging Face / PyTorch) to MLX (``mlx_eve.conversion``).

python -m mlx_eve.convert --hf-path BAAI/EVE-7B-HD-v2.0 --mlx-path eve-v2-4bit -q
"""

import argparse
import shlex
import sys
from typing import List, Optional

from ..arguments import DTYPES, QUANT_RECIPES, ArgumentParser
from ..errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Convert an EVE checkpoint (Hugging Face / PyTorch) to MLX.")
    p.add_argument(
        "--hf-path", "--model", required=True, help="Local folder or Hugging Face repo of the original model."
    )
    p.add_argument("--mlx-path", default="mlx_model", help="Where to write the MLX model.")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the decoder and embeddings.")
    p.add_argument("--q-bits", type=int, default=4, choices=[2, 3, 4, 6, 8], help="Bits per weight.")
    p.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128], help="Quantization group size.")
    p.add_argument(
        "--quant-predicate",
        choices=QUANT_RECIPES,
        default=None,
        help="mlx-lm's mixed-precision recipe: more bits for the LM head and for v_proj/down_proj of some layers.",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="Floating point type (default: the checkpoint's).")
    p.add_argument("-d", "--dequantize", action="store_true", help="Dequantize a quantized MLX model.")
    p.add_argument("--upload-repo", default=None, help="Hugging Face repo to upload the result to.")
    p.add_argument("--force", action="store_true", help="Replace an existing, non-empty --mlx-path.")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to convert.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    from ..conversion import convert

    command = shlex.join(["python", "convert.py", *(sys.argv[1:] if argv is None else argv)])
    return run_cli(
        lambda: convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize or bool(args.quant_predicate),
            q_group_size=args.q_group_size,
            q_bits=args.q_bits,
            quant_predicate=args.quant_predicate,
            dtype=args.dtype,
            dequantize=args.dequantize,
            upload_repo=args.upload_repo,
            force=args.force,
            revision=args.revision,
            command=command,
        ),
        interrupted="interrupted: nothing was written",
    )
