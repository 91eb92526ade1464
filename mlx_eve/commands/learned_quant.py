"""The learned quantization commands, calibrated on images: ``mlx_eve.awq``, ``mlx_eve.gptq``, ``mlx_eve.dwq`` and
``mlx_eve.dynamic_quant``, with mlx-lm's names, flags and defaults where they apply.

python -m mlx_eve.awq --model eve-v2 --data-path data/ --bits 3 --mlx-path eve-v2-awq-3bit
"""

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from ..arguments import COUNT, COUNT_OR_ALL, FILE, FILE_OR_FOLDER, POSITIVE, SEED, ArgumentParser, number
from ..errors import run_cli

BITS = [2, 3, 4, 5, 6, 8]  # the widths MLX quantizes to
GROUP_SIZES = [32, 64, 128]
TARGET_BPW = number(float, "bits per weight from 2 to 9", lambda v: 2 <= v <= 9)


def _parser(name: str, description: str, num_samples: int, bits: bool = True) -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m mlx_eve.{name}", description=description)
    add = p.add_argument
    add("--model", "-m", required=True, help="The floating-point model to quantize: a folder or Hugging Face repo.")
    add("--mlx-path", default="mlx_model", help="Where to write the quantized model (default %(default)s).")
    add(
        "--data-path",
        type=FILE_OR_FOLDER,
        required=True,
        help="Calibration images and conversations: a folder with train.jsonl (and valid.jsonl), or one "
        ".json/.jsonl file, in the fine-tuning (LLaVA, mlx-vlm) or evaluation (VQA) layout.",
    )
    add(
        "--num-samples",
        type=COUNT_OR_ALL,
        default=num_samples,
        help="Records drawn from the training split, -1 for all (default %(default)s).",
    )
    add("--max-seq-length", type=COUNT, default=4096, help="Longest record in tokens, images included.")
    add("--max-size", type=COUNT, default=None, help="EVEv2 image resolution (default: the model's).")
    add("--seed", type=SEED, default=123, help="Random seed for drawing the samples (default %(default)s).")
    add("--force", action="store_true", help="Replace an existing, non-empty --mlx-path.")
    if bits:
        add("--bits", type=int, choices=BITS, default=4, help="Bits per weight (default %(default)s).")
        add("--group-size", type=int, choices=GROUP_SIZES, default=64, help="Quantization group size.")
    return p


def build_awq_parser() -> ArgumentParser:
    p = _parser("awq", "AWQ, calibrated on images, for an EVE model.", num_samples=128)
    p.add_argument("--embed-bits", type=int, choices=BITS, default=4, help="Bits of the embedding and LM head.")
    p.add_argument("--embed-group-size", type=int, choices=GROUP_SIZES, default=32, help="Their group size.")
    p.add_argument("--n-grid", type=COUNT, default=20, help="Scales and clips tried per layer (default 20).")
    return p


def build_gptq_parser() -> ArgumentParser:
    p = _parser("gptq", "GPTQ, calibrated on images, for an EVE model.", num_samples=128)
    p.add_argument("--fallback-bits", type=int, choices=BITS, default=6, help="Bits of the embedding.")
    p.add_argument("--fallback-group-size", type=int, choices=GROUP_SIZES, default=64, help="Its group size.")
    p.add_argument("--batch-size", type=COUNT, default=8, help="Samples per pass (default %(default)s).")
    return p


def build_dwq_parser() -> ArgumentParser:
    p = _parser("dwq", "DWQ: distil an EVE model into its quantized version on images.", num_samples=2048)
    add = p.add_argument
    add("--quantized-model", default=None, help="The quantized student to improve (default: --model rounded).")
    add("--learning-rate", type=POSITIVE, default=1e-6, help="Adam's learning rate (default %(default)s).")
    add("--batch-size", type=COUNT, default=4, help="Samples per step (default %(default)s).")
    add("--iters", type=COUNT, default=None, help="Training steps (default: one pass over --num-samples).")
    add("--num-valid-samples", type=COUNT, default=32, help="Held-out samples for the loss (default 32).")
    add("--save-every", type=COUNT, default=100, help="Steps between checkpoints (default %(default)s).")
    add("--resume", action="store_true", help="Continue from the last checkpoint in <mlx-path>.dwq-checkpoint.")
    return p


def build_dynamic_quant_parser() -> ArgumentParser:
    p = _parser("dynamic_quant", "More bits where an EVE model is most sensitive, measured on images.", 128, False)
    add = p.add_argument
    add("--target-bpw", type=TARGET_BPW, default=5.0, help="Bits per weight to reach (default %(default)s).")
    add("--low-bits", type=int, choices=BITS, default=4, help="Bits of the less sensitive layers.")
    add("--low-group-size", type=int, choices=GROUP_SIZES, default=64, help="Their group size.")
    add("--high-bits", type=int, choices=BITS, default=5, help="Bits of the most sensitive layers.")
    add("--high-group-size", type=int, choices=GROUP_SIZES, default=64, help="Their group size.")
    add("--sensitivities", type=FILE, default=None, help="Sensitivities computed before (a sensitivities.json).")
    add("--batch-size", type=COUNT, default=4, help="Samples per gradient (default %(default)s).")
    return p


def awq_main(argv: Optional[List[str]] = None) -> int:
    args = build_awq_parser().parse_args(argv)
    from ..quant.awq import awq_quantize

    return _run(
        "awq",
        args,
        argv,
        lambda model, samples: awq_quantize(
            model, samples, args.bits, args.group_size, args.embed_bits, args.embed_group_size, args.n_grid
        ),
    )


def gptq_main(argv: Optional[List[str]] = None) -> int:
    args = build_gptq_parser().parse_args(argv)
    from ..quant.gptq import gptq_quantize

    return _run(
        "gptq",
        args,
        argv,
        lambda model, samples: gptq_quantize(
            model, samples, args.bits, args.group_size, args.fallback_bits, args.fallback_group_size, args.batch_size
        ),
    )


def dynamic_quant_main(argv: Optional[List[str]] = None) -> int:
    args = build_dynamic_quant_parser().parse_args(argv)
    if args.high_bits <= args.low_bits:
        build_dynamic_quant_parser().error("--high-bits must be more than --low-bits")
    import json

    from ..quant.dynamic_quant import dynamic_quantize, estimate_sensitivities

    widths = (args.low_bits, args.low_group_size, args.high_bits, args.high_group_size)

    def quantize(model, samples):
        if args.sensitivities:
            sensitivities = json.loads(args.sensitivities.read_text())
        else:
            sensitivities = estimate_sensitivities(model, samples, *widths, batch_size=args.batch_size)
        dynamic_quantize(model, sensitivities, args.target_bpw, *widths)
        return sensitivities

    def keep_sensitivities(out: Path, sensitivities) -> None:
        (out / "sensitivities.json").write_text(json.dumps(sensitivities, indent=1))
        print(f"Sensitivities in {out / 'sensitivities.json'} (reuse them with --sensitivities).")

    return _run("dynamic_quant", args, argv, quantize, after_save=keep_sensitivities, needs_data=not args.sensitivities)


def dwq_main(argv: Optional[List[str]] = None) -> int:
    args = build_dwq_parser().parse_args(argv)
    return run_cli(lambda: _dwq(args, argv), interrupted="interrupted: no model was written; resume with --resume")


def _command(name: str, argv: Optional[List[str]]) -> str:
    return shlex.join(["python", "-m", f"mlx_eve.{name}", *(sys.argv[1:] if argv is None else argv)])


def _run(
    name: str,
    args: argparse.Namespace,
    argv: Optional[List[str]],
    quantize: Callable,
    after_save: Optional[Callable] = None,
    needs_data: bool = True,
) -> int:
    def work() -> None:
        import mlx.core as mx
        from mlx_lm.utils import compute_bits_per_weight

        from ..quant.calibration import load_calibration, load_for_quantization, save_quantized
        from ..saving import check_output

        check_output(Path(args.mlx_path), args.force, keep=[Path(args.model)])
        tic = time.perf_counter()
        model, processor, config, path = load_for_quantization(args.model, args.max_size)
        samples = []
        if needs_data:
            samples = load_calibration(
                args.data_path, model, processor, args.num_samples, args.max_seq_length, args.seed
            )
            print(f"Calibrating on {len(samples)} samples from {args.data_path}.")
        result = quantize(model, samples)
        out = save_quantized(model, processor, config, args.mlx_path, args.model, _command(name, argv), args.force)
        print(f"Quantized to {compute_bits_per_weight(model):.3f} bits per weight (as saved).")
        if after_save:
            after_save(out, result)
        print(f"Saved {out} in {time.perf_counter() - tic:.0f} s; peak memory {mx.get_peak_memory() / 2**30:.3f} GiB.")

    return run_cli(work, interrupted="interrupted: nothing was written")


def _dwq(args: argparse.Namespace, argv: Optional[List[str]]) -> None:
    import copy
    import shutil

    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight

    from .. import quantization
    from ..data import load_splits
    from ..loading import load
    from ..quant.calibration import draw, load_for_quantization, save_quantized
    from ..quant.dwq import dwq_quantize
    from ..saving import check_output
    from ..trainer import TrainingArgs

    out = Path(args.mlx_path)
    check_output(out, args.force, keep=[Path(args.model)])
    checkpoint = out.with_name(out.name + ".dwq-checkpoint")
    tic = time.perf_counter()
    teacher, processor, config, _ = load_for_quantization(args.model, args.max_size)
    splits = load_splits(args.data_path, processor, args.max_seq_length)
    train_set, valid_set = draw(splits, args.num_samples, args.seed, args.num_valid_samples)
    if args.quantized_model:
        student, _ = load(args.quantized_model, max_size=args.max_size)
        if not quantization.of_model(student):
            raise quantization.QuantizationError(f"--quantized-model {args.quantized_model} is not quantized.")
    else:
        student = copy.deepcopy(teacher)
        keep_float = student.family.patch_embedding_paths
        quantization.apply(student, quantization.plan(student, args.bits, args.group_size, keep_float=keep_float))
    training = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters or max(len(train_set) // args.batch_size, 1),
        learning_rate=args.learning_rate,
        patch_embedding_lr_scale=1.0,
        lr_schedule="constant",
        warmup=0,
        optimizer="adam",
        weight_decay=0.0,
        max_grad_norm=None,
        grad_accumulation_steps=1,
        val_batches=-1,
        steps_per_report=10,
        steps_per_eval=args.save_every,
        save_every=args.save_every,
        seed=args.seed,
    )
    print(f"Distilling on {len(train_set)} samples from {args.data_path} for {training.iters} steps.")
    dwq_quantize(student, teacher, train_set, valid_set, processor.image_processor, training, checkpoint, args.resume)
    save_quantized(student, processor, config, out, args.model, _command("dwq", argv), args.force)
    print(f"Quantized to {compute_bits_per_weight(student):.3f} bits per weight (as saved).")
    shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"Saved {out} in {time.perf_counter() - tic:.0f} s; peak memory {mx.get_peak_memory() / 2**30:.3f} GiB.")
