"""Score a model on the shapes dataset: accuracy per question type and overall, with greedy one-word answers.

    python examples/shapes/evaluate.py --model path/to/model --data data/shapes --split test

Reads both the LLaVA (``conversations``) and the mlx-vlm (``messages``) layout written by make_dataset.py.
In a multi-turn sample the earlier questions and their expected answers are given as conversation history,
and only the last question is scored.
"""

import argparse
import json
import string
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Union

from mlx_eve import generate, load
from mlx_eve.prompts import IMAGE_PLACEHOLDER

ROLES = {"human": "user", "gpt": "assistant"}


def load_samples(path: Union[str, Path]) -> List[dict]:
    """The samples of a JSONL file, one per non-empty line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def messages_of(sample: dict) -> List[Dict[str, str]]:
    """The sample's conversation as role/content messages (user first, assistant last)."""
    if "messages" in sample:
        return [{"role": m["role"], "content": m["content"]} for m in sample["messages"]]
    return [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in sample["conversations"]]


def image_of(sample: dict) -> str:
    return sample["image"] if "image" in sample else sample["images"][0]


def normalise(answer: str) -> str:
    return answer.strip().rstrip(string.punctuation + string.whitespace).lower()


def evaluate(model, processor, samples: List[dict], data_dir: Union[str, Path], max_tokens: int = 8) -> dict:
    """Ask each sample's last question and compare the normalised answer with the expected one.

    Returns ``accuracy`` (overall), ``by_type`` ({question type: accuracy}), ``counts`` ({question type:
    number of samples}) and ``wrong`` (one dict per wrong answer: image, question, expected, answer).
    """
    correct, total = Counter(), Counter()
    wrong = []
    for sample in samples:
        *history, expected = messages_of(sample)
        image = Path(data_dir) / image_of(sample)
        answer = normalise(generate(model, processor, history, image=str(image), max_tokens=max_tokens, temp=0.0))
        kind = sample["question_type"]
        total[kind] += 1
        if answer == normalise(expected["content"]):
            correct[kind] += 1
        else:
            question = history[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
            wrong.append(
                {"image": image_of(sample), "question": question, "expected": expected["content"], "answer": answer}
            )
    return {
        "accuracy": sum(correct.values()) / max(sum(total.values()), 1),
        "by_type": {kind: correct[kind] / total[kind] for kind in sorted(total)},
        "counts": dict(sorted(total.items())),
        "wrong": wrong,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Accuracy of a model on the shapes dataset.")
    p.add_argument("--model", required=True, help="Model folder or Hugging Face repo.")
    p.add_argument("--data", required=True, type=Path, help="Dataset folder written by make_dataset.py.")
    p.add_argument("--split", default="test", help="Which <split>.jsonl to score.")
    p.add_argument("--adapter-path", default=None, help="Folder with LoRA adapters to apply.")
    p.add_argument("--limit", type=int, default=None, help="Score only the first N samples.")
    p.add_argument("--max-size", type=int, default=None, help="EVEv2 image resolution (default: the model's).")
    args = p.parse_args(argv)

    samples = load_samples(args.data / f"{args.split}.jsonl")[: args.limit]
    model, processor = load(args.model, adapter_path=args.adapter_path, max_size=args.max_size)
    start = time.perf_counter()
    result = evaluate(model, processor, samples, args.data)
    seconds = time.perf_counter() - start

    print(f"{'question type':<15}{'samples':>8}{'accuracy':>10}")
    for kind, accuracy in result["by_type"].items():
        print(f"{kind:<15}{result['counts'][kind]:>8}{accuracy:>10.1%}")
    print(f"{'overall':<15}{len(samples):>8}{result['accuracy']:>10.1%}")
    print(f"({len(samples)} samples in {seconds:.1f} s)")
    if result["wrong"]:
        print("\nSome wrong answers:")
        for w in result["wrong"][:5]:
            print(f"  {w['image']}: {w['question']!r} expected {w['expected']!r}, got {w['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
