"""The ``evaluate`` command: score a model's greedy answers against reference answers (``mlx_eve.scoring``).

python -m mlx_eve.evaluate --model M --data test.jsonl --output predictions.jsonl
"""

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import List, Optional

from ..arguments import COUNT, FILE_OR_FOLDER, FOLDER, METRICS, ArgumentParser, add_model_options
from ..errors import EVEError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Score an EVE model's greedy answers against reference answers.")
    add = p.add_argument
    add_model_options(p)
    add(
        "--data",
        type=FILE_OR_FOLDER,
        required=True,
        help="A .jsonl/.json file, or a folder: its test.jsonl (valid.jsonl if it has no test split).",
    )
    add("--image-folder", type=FOLDER, default=None, help="Where image paths point (default: next to the data).")
    add("--limit", type=COUNT, default=None, help="Score only the first N records.")
    add("--output", "-o", type=Path, default=None, help="Write one JSON line per question (predictions.jsonl).")
    add(
        "--metric",
        choices=METRICS,
        default="exact",
        help="exact: the normalised answer is a reference; contains: it holds one (default %(default)s).",
    )
    add("--max-tokens", "-m", type=COUNT, default=32, help="Maximum answer length (default %(default)s).")
    add("--batch-size", type=COUNT, default=8, help="Questions answered together (default %(default)s).")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    import mlx.core as mx

    from ..loading import load
    from ..scoring import data_file, predict, read_questions, summary_table
    from .progress import advance, progress_bar

    file = data_file(args.data)
    questions = read_questions(file, args.image_folder, args.limit)
    if args.output is not None and not args.output.parent.is_dir():
        raise EVEError(f"No such folder for --output: {args.output.parent}")
    print(f"Scoring {len(questions)} questions from {file}")
    model, processor = load(args.model, adapter_path=args.adapter_path, max_size=args.max_size)
    predictions, right, tic = [], 0, time.perf_counter()
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(open(args.output, "w", encoding="utf-8")) if args.output else None
        bar = stack.enter_context(progress_bar(len(questions), 0, "question"))
        for prediction in predict(
            model,
            processor,
            questions,
            metric=args.metric,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        ):
            predictions.append(prediction)
            right += prediction.correct
            if output:
                output.write(json.dumps(prediction.to_json(), ensure_ascii=False) + "\n")
                output.flush()
            advance(bar, f"{right / len(predictions):.1%} right")
    print(summary_table(predictions))
    failed = sum(p.error is not None for p in predictions)
    seconds, peak = time.perf_counter() - tic, mx.get_peak_memory() / 1e9
    print(
        f"({len(predictions)} questions in {seconds:.1f} s, peak memory {peak:.3f} GB"
        + (f"; {failed} could not be asked, counted as wrong" if failed else "")
        + (f"; predictions in {args.output})" if args.output else ")")
    )
