"""Teach the demo model a question type it never saw ("Is the red circle big or small?") with LoRA, and
with QLoRA on its 4-bit conversion; print the held-out accuracy before and after.

    python examples/shapes/lora_example.py --work data/shapes-lora

Re-running it with the same --work resumes where it stopped.
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from evaluate import evaluate, load_samples  # noqa: E402

from mlx_eve import load  # noqa: E402
from mlx_eve.demo import BUNDLED_MODEL  # noqa: E402


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode:
        sys.exit(done.returncode)


def accuracy(model_path: Path, data: Path, adapters: Path = None) -> float:
    model, processor = load(str(model_path), adapter_path=adapters and str(adapters))
    return evaluate(model, processor, load_samples(data / "test.jsonl"), data)["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "data" / "shapes-lora")
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--test", type=int, default=300, help="Held-out images to score.")
    p.add_argument("--no-qlora", action="store_true", help="LoRA on the float16 model only (QLoRA is slow on a CPU).")
    args = p.parse_args()
    data, q4 = args.work / "size", args.work / "model-4bit"
    if not (data / "test.jsonl").exists():
        run(
            str(HERE / "make_dataset.py"),
            "--out",
            str(data),
            "--tasks",
            "size",
            "--train",
            "2000",
            "--valid",
            "200",
            "--test",
            str(args.test),
            "--seed",
            "7",
        )
    if not args.no_qlora and not (q4 / "config.json").exists():
        run("convert.py", "--hf-path", str(args.model), "--mlx-path", str(q4), "-q", "--q-bits", "4")
    results = {}
    variants = [("LoRA", args.model)] + ([] if args.no_qlora else [("QLoRA (4-bit base)", q4)])
    for name, model in variants:
        adapters = args.work / f"adapters-{model.name}"
        resume = ["--resume"] if (adapters / "checkpoint" / "state.json").exists() else []
        run(
            "-m",
            "mlx_eve.lora",
            "--model",
            str(model),
            "--train",
            "--data",
            str(data),
            "--iters",
            str(args.iters),
            "--batch-size",
            str(args.batch_size),
            "--learning-rate",
            str(args.learning_rate),
            "--lora-rank",
            "8",
            "--train-patch-embedding",
            "--steps-per-report",
            "50",
            "--steps-per-eval",
            "200",
            "--val-batches",
            "5",
            "--adapter-path",
            str(adapters),
            *resume,
        )
        results[name] = (accuracy(model, data), accuracy(model, data, adapters))
    print(f"\nHeld-out 'big or small?' accuracy ({args.test} test images)")
    for name, (before, after) in results.items():
        print(f"  {name:20s} before {before:6.1%}   after {after:6.1%}")


if __name__ == "__main__":
    main()
