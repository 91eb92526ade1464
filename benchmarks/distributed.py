"""Per-rank peak memory after loading, and speed, of a tensor-parallel EVEv2: 1 process against N on this machine.

Writes a random float32 EVEv2 checkpoint in the original layout (text and ``moe_*`` copies of 6 layers at
hidden size 2048, 16 heads / 2 key/value heads, ≈ 2.1 GB) unless ``--model`` names one, then runs itself as
the worker: in one process, and in N under ``mlx.launch --backend ring`` (localhost). Each rank reports the
bytes of weights it holds, ``mx.get_peak_memory()`` right after ``load``, and the prompt and generation
speed of one image question (``--max-tokens`` tokens, no stop token). The BLAS threads are shared out: each
of N processes gets ``cores / N`` (``OPENBLAS_NUM_THREADS``), so 1 and N processes use the same cores.

With ``--server``, the same through ``mlx_eve.server`` instead: per process count, the time to the first token
and the generation speed of streamed answers to the image question, asked twice (the second finds the prompt
in the prompt cache).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/distributed.py
    python benchmarks/distributed.py --model eve-v2-4bit --processes 1 2 4
    python benchmarks/distributed.py --server
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def launch(processes: int, *args: str) -> tuple:
    """The command that runs ``python ARGS`` on ``processes`` processes, and its environment."""
    command, env = [sys.executable, *args], dict(os.environ)
    if processes > 1:
        launcher = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(processes), "--backend", "ring"]
        command = [*launcher, "--python", sys.executable, "--", *args]
        env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return command, env


def run(processes: int, args: argparse.Namespace, model: Path, image: Path, out: Path) -> None:
    command, env = launch(processes, __file__, "--worker", str(out), "--model", str(model), "--image", str(image))
    subprocess.run([*command, "--max-tokens", str(args.max_tokens)], check=True, cwd=ROOT, env=env)


def serve_and_ask(processes: int, args: argparse.Namespace, model: Path, image: Path, log: Path) -> list:
    """``mlx_eve.server`` on ``processes`` processes: two streamed answers to the image question, each as
    (prompt tokens, generated tokens, seconds to the first token, generation tokens/s)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command, env = launch(processes, "-m", "mlx_eve.server", "--model", str(model), "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        # A group of its own, for Ctrl-C to reach every process as from a terminal.
        server = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even when run in the background
        )
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"The server exited:\n{log.read_text()}")
            try:
                urllib.request.urlopen(f"{url}/health")
                break
            except OSError:
                time.sleep(0.5)
        uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        question = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is in the image?"}]
        body = {
            "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return [stream_answer(f"{url}/v1/chat/completions", body) for _ in range(2)]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait()


def stream_answer(url: str, body: dict) -> tuple:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start, times, usage = time.perf_counter(), [], None
    with urllib.request.urlopen(request) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    tokens = usage["completion_tokens"]
    return usage["prompt_tokens"], tokens, times[0] - start, (tokens - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="An EVE model folder (default: write a random EVEv2 one).")
    parser.add_argument("--processes", "-n", type=int, nargs="+", default=[1, 2], help="Process counts to run.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens to generate (default 64).")
    parser.add_argument("--server", action="store_true", help="Time answers of mlx_eve.server instead.")
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
        if args.server:
            print("| processes | answer | prompt tokens | generated tokens | first token s | generation tok/s |")
            print("|---|---|---|---|---|---|")
            for processes in args.processes:
                answers = serve_and_ask(processes, args, model, image, work / f"server-{processes}.log")
                for i, (prompt, tokens, first, tps) in enumerate(answers, 1):
                    print(f"| {processes} | {i} | {prompt} | {tokens} | {first:.2f} | {tps:.2f} |", flush=True)
            return
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
