"""Score a model on the shapes dataset with ``mlx_eve.evaluate``: accuracy per question type and overall.

    python examples/shapes/evaluate.py --model path/to/model --data data/shapes --split test

is ``python -m mlx_eve.evaluate --model path/to/model --data data/shapes/test.jsonl --max-tokens 8`` (one-word
answers); every other option is that command's. The functions below serve train.py, lora_example.py and the
tests, on samples as make_dataset.py writes them.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

from mlx_eve import scoring
from mlx_eve.commands import evaluate as evaluate_command
from mlx_eve.records import parse_record


def load_samples(path: Union[str, Path]) -> List[dict]:
    """The samples of a JSONL file, one per non-empty line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def messages_of(sample: dict) -> List[Dict[str, str]]:
    """The sample's conversation as role/content messages (user first, assistant last)."""
    return parse_record(sample, Path())[0]


def evaluate(model, processor, samples: List[dict], data_dir: Union[str, Path], max_tokens: int = 8) -> dict:
    """Ask each sample's last question (the earlier turns as history) and score the greedy answer.

    Returns ``accuracy`` (overall), ``by_type`` ({question type: accuracy}), ``counts`` ({question type:
    number of samples}) and ``wrong`` (one dict per wrong answer: image, question, expected, answer normalised).
    """
    questions = [scoring.parse_question(s, f"sample {i}", Path(data_dir)) for i, s in enumerate(samples, 1)]
    predictions = list(scoring.predict(model, processor, questions, max_tokens=max_tokens))
    by_type = scoring.tally(predictions)
    wrong = [
        {
            "image": str(p.question.images[0].relative_to(Path(data_dir))),
            "question": p.question.text,
            "expected": p.question.references[0],
            "answer": scoring.normalise(p.answer or ""),
        }
        for p in predictions
        if not p.correct
    ]
    return {
        "accuracy": sum(p.correct for p in predictions) / max(len(predictions), 1),
        "by_type": {kind: correct / total for kind, (correct, total) in by_type.items()},
        "counts": {kind: total for kind, (_, total) in by_type.items()},
        "wrong": wrong,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--split", default="test")
    args, rest = p.parse_known_args(argv)
    data = [] if args.data is None else ["--data", str(args.data / f"{args.split}.jsonl")]
    return evaluate_command.main(["--max-tokens", "8", *data, *rest])


if __name__ == "__main__":
    sys.exit(main())
