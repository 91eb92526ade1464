"""Per-rank peak memory after loading, and speed, of a tensor-parallel EVEv2: 1 process against N on this machine.

Writes a random float32 EVEv2 checkpoint in the original layout (text and ``moe_*`` copies of 6 layers at
hidden size 2048, 16 heads / 2 key/value heads, ≈ 2.1 GB) unless ``--model`` names one, then runs itself as
the worker: in one process, and in N under ``mlx.launch --backend ring`` (localhost). Each rank reports the
bytes of weights it holds, ``mx.get_peak_memory()`` right after ``load``, and the prompt and generation
speed of one image question (``--max-tokens`` tokens, no stop token). The BLAS threads are shared out: each
of N processes gets ``cores / N`` (``OPENBLAS_NUM_THREADS``), so 1 and N processes use the same cores.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/distributed.py
    python benchmarks/distributed.py --model eve-v2-4bit --processes 1 2 4
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=2,
    num_hidden_layers=6,
    mm_hidden_size=1024,
)


def worker(model_path: str, image: str, max_tokens: int, out: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_eve import load, stream_generate

    group = mx.distributed.init()
    mx.reset_peak_memory()
    start = time.perf_counter()
    model, processor = load(model_path, group=group)
    load_seconds = time.perf_counter() - start
    load_peak = mx.get_peak_memory()
    split = sum(
        v.nbytes
        for _, m in model.named_modules()
        if "Sharded" in type(m).__name__
        for _, v in tree_flatten(m.parameters())
    )
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    processor.tokenizer.eos_token_ids = set()  # always generate max_tokens
    *_, response = stream_generate(model, processor, "What is in the image?", image, max_tokens=max_tokens)
    report = {
        "held_gb": held / 1e9,
        "split_gb": split / 1e9,
        "load_peak_gb": load_peak / 1e9,
        "load_s": load_seconds,
        "prompt_tokens": response.prompt_tokens,
        "prompt_tps": response.prompt_tps,
        "generation_tps": response.generation_tps,
        "peak_gb": response.peak_memory,
    }
    (out / f"{group.size()}-{group.rank()}.json").write_text(json.dumps(report))


def write_checkpoint(path: Path) -> None:
    import tiny_checkpoints

    tiny_checkpoints.build("v2", path, preprocessor=tiny_checkpoints.v2_preprocessor(448), **SHAPE)


def write_image(path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((120, 100, 380, 340), fill=(220, 30, 30))
    image.save(path)


def run(processes: int, args: argparse.Namespace, model: Path, image: Path, out: Path) -> None:
    command = [__file__, "--worker", str(out), "--model", str(model), "--image", str(image)]
    command += ["--max-tokens", str(args.max_tokens)]
    env = dict(os.environ)
    if processes == 1:
        command = [sys.executable, *command]
    else:
        launcher = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(processes), "--backend", "ring"]
        command = [*launcher, "--python", sys.executable, "--", *command]
        env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="An EVE model folder (default: write a random EVEv2 one).")
    parser.add_argument("--processes", "-n", type=int, nargs="+", default=[1, 2], help="Process counts to run.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens to generate (default 64).")
    parser.add_argument("--image", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.model, args.image, args.max_tokens, args.worker)
    else:
        benchmark(args)


def benchmark(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="eve-distributed-bench-"))
    try:
        model = Path(args.model) if args.model else work / "model"
        if args.model is None:
            print(f"Writing a random EVEv2 checkpoint to {model} ...", flush=True)
            write_checkpoint(model)
        image = work / "image.png"
        write_image(image)
        print(
            "| processes | rank | weights held GB (split part) | peak after load GB | load s | "
            "prompt tokens | prompt tok/s | generation tok/s | peak GB |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for processes in args.processes:
            out = work / f"run-{processes}"
            out.mkdir()
            run(processes, args, model, image, out)
            for rank in range(processes):
                r = json.loads((out / f"{processes}-{rank}.json").read_text())
                print(
                    f"| {processes} | {rank} | {r['held_gb']:.3f} ({r['split_gb']:.3f}) | {r['load_peak_gb']:.3f} | "
                    f"{r['load_s']:.1f} | {r['prompt_tokens']} | {r['prompt_tps']:.1f} | "
                    f"{r['generation_tps']:.2f} | {r['peak_gb']:.3f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
