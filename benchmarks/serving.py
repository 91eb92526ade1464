"""Benchmark ``python -m mlx_eve.server`` against ``mlx_lm.server`` serving the same text weights, in one run.

An EVEv2 checkpoint with random weights is written at a chosen shape (an mlx-eve model folder), and beside it an
mlx-lm Qwen2 folder holding its text-branch arrays (the text copies of every layer, the embedding, final norm and
head: what ``speed.text_weights`` gives mlx-lm's Qwen2), with the same tokenizer and, for mlx-lm, a chat template
that writes EVE's prompt (system prompt, ``USER: ... ASSISTANT:``), so both servers see the same prompt tokens.

The tokenizer is a byte-level BPE in Qwen2.5's layout (its pre-tokenizer and three special tokens) whose
vocabulary is exactly the embedding's (151936 at the Qwen2.5 shapes): the 256 byte tokens, then merges of two and
three printable ASCII characters. Any id the random model picks is a token of both servers' tokenizers and
decodes to text, so every streamed chunk carries a token.

Each server is started alone and warmed up (one round at the largest stream count); then for each N in
``--streams``, N streamed chat completions are sent at once, each with its own prompt of ``--prompt-tokens`` text
tokens (no prompt cache can serve one from another; both servers' prompt caches are off), greedy, with the
end-of-answer tokens biased off (-100) so that every answer runs to ``--max-tokens``; the token counts of both
sides are checked and any difference is printed. Per stream: time to first token and decode tokens/s (after the
first token); per round: aggregate tokens/s (all generated tokens ÷ first request to last token) and the spread
of the times to first token (max - min). mlx-eve alone also answers N streams with a ``--image-size``² image each
(mlx-lm has no image path for this model).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/serving.py
    python benchmarks/serving.py --shape v2-tiny --streams 1 2 --max-tokens 8 --image-streams 1
    python benchmarks/serving.py --shape v2-7b --dtype bfloat16 --streams 1 4 8 16
"""

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image
from speed import DTYPES, SHAPES, build_models, machine, shape_config, text_weights
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from mlx_eve.arguments import COUNT, SEED, ArgumentParser
from mlx_eve.families import family_of
from mlx_eve.prompts import DEFAULT_SYSTEM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_checkpoints import QWEN2_SPECIAL, QWEN2_SPLIT  # noqa: E402

EVE_SHAPES = [name for name in SHAPES if SHAPES[name].config["model_type"] == "eve-qwen2"]
# speed.py's v2-tiny has 256 ids: fewer than a byte-level tokenizer's 256 bytes and 3 special tokens.
VOCAB_SIZES = {"v2-tiny": 1024}
# EVE's prompt for one user message, as mlx-lm's server renders it with the tokenizer's chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + DEFAULT_SYSTEM
    + " USER: {{ message['content'] }}{% endif %}{% endfor %} ASSISTANT:"
)
END_BIAS = -100.0  # OpenAI's lowest logit bias, on the end-of-answer tokens
WARMUP_TOKENS = 4
# The bytes the merged tokens are made of: printable ASCII and the space, in the byte-level alphabet.
PRINTABLE = ["Ġ"] + [chr(c) for c in range(0x21, 0x7F)]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# Building the two model folders


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer of exactly ``vocab_size`` tokens, the special ones last."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    wanted = vocab_size - len(alphabet) - len(QWEN2_SPECIAL)
    pairs = [(a, b) for a in PRINTABLE for b in PRINTABLE]
    triples = [(a + b, c) for a, b in pairs for c in PRINTABLE]
    if not 0 < wanted <= len(pairs) + len(triples):
        raise ValueError(f"A byte-level tokenizer cannot have {vocab_size} tokens.")
    merges = (pairs + triples)[:wanted]
    vocab = {token: i for i, token in enumerate(alphabet + ["".join(m) for m in merges])}
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(QWEN2_SPECIAL)
    return tokenizer


def write_tokenizer(folder: Path, tokenizer: Tokenizer, chat_template: Optional[str] = None) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def end_token_ids(tokenizer: Tokenizer) -> List[int]:
    """The tokens that end an answer: EVEv2's stop tokens (``<|im_end|>``, ``<|endoftext|>``)."""
    return [tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]


def write_folders(shape: str, layers: Optional[int], dtype: str, image_size: int, work: Path) -> dict:
    """The mlx-eve and the mlx-lm model folders under ``work``; the config both were built from."""
    config = shape_config(shape, layers)
    config["vocab_size"] = VOCAB_SIZES.get(shape, config["vocab_size"])
    tokenizer = byte_level_tokenizer(config["vocab_size"])
    eve, _ = build_models(config, DTYPES[dtype])  # mlx-lm's Qwen2 loads the text weights strictly: names checked
    generation = {"eos_token_id": end_token_ids(tokenizer), "do_sample": False}
    folders = {"mlx-eve": work / "eve", "mlx-lm": work / "mlx-lm"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    eve_folder = folders["mlx-eve"]
    mx.save_safetensors(str(eve_folder / "model.safetensors"), dict(tree_flatten(eve.parameters())), {"format": "mlx"})
    eve_config = {**config, "architectures": ["EVEQwen2ForCausalLM"], "torch_dtype": dtype}
    (eve_folder / "config.json").write_text(json.dumps(eve_config, indent=2))
    processor = family_of(config["model_type"]).image_processor(max_size=image_size)
    (eve_folder / "preprocessor_config.json").write_text(json.dumps(processor.to_dict(), indent=2))
    write_tokenizer(eve_folder, tokenizer)

    lm_folder = folders["mlx-lm"]
    mx.save_safetensors(str(lm_folder / "model.safetensors"), dict(text_weights(eve)), {"format": "mlx"})
    eve_only = ("mm_hidden_size", "add_moe", "moe_part")
    lm_config = {k: v for k, v in config.items() if k not in eve_only}
    lm_config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], torch_dtype=dtype)
    (lm_folder / "config.json").write_text(json.dumps(lm_config, indent=2))
    write_tokenizer(lm_folder, tokenizer, CHAT_TEMPLATE)
    return {"config": config, "folders": folders, "tokenizer": tokenizer}


# Prompts


def prompt_text(tokenizer: Tokenizer, tokens: int, rng: np.random.Generator) -> str:
    """Random words of exactly ``tokens`` tokens (a word of one letter after a space is one token)."""
    words: List[str] = []
    while True:
        count = len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) if words else 0
        if count == tokens:
            return " ".join(words)
        if count > tokens:
            words[-1] = str(rng.choice(list(LETTERS)))
            continue
        length = 1 if tokens - count < 4 else int(rng.integers(1, 8))
        words.append("".join(rng.choice(list(LETTERS), length)))


def image_uri(side: int, rng: np.random.Generator) -> str:
    """A ``side``² PNG of random pixels as a data URI: every stream's image is its own."""
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def request_body(text: str, max_tokens: int, end_ids: Sequence[int], image: Optional[str] = None) -> dict:
    content = (
        text if image is None else [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    )
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(i): END_BIAS for i in end_ids},
    }


# Servers and streams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port of 127.0.0.1, its output in ``log``; ready once ``/health`` answers."""

    def __init__(self, module: str, folder: Path, options: Sequence[str], log: Path, timeout: float):
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", module, "--model", str(folder), "--port", str(self.port), *options]
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{module} did not start (its log, {log}):\n{tail}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        """Ctrl-C, then a kill if it has not stopped within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Stream:
    sent: float  # perf_counter when the request went out
    first: float  # ... when the first token arrived
    last: float  # ... when the last token arrived
    prompt_tokens: int
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 and self.last > self.first else 0.0


def stream_answer(port: int, body: dict, start: threading.Barrier, timeout: float) -> Stream:
    """One streamed chat completion, sent once every stream of the round is ready."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode()
    try:
        start.wait()
        sent = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        times, usage = [], None
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    finally:
        connection.close()
    if not times or usage is None:
        raise RuntimeError("a stream ended without tokens or usage")
    return Stream(sent, times[0], times[-1], usage["prompt_tokens"], usage["completion_tokens"])


def run_round(port: int, bodies: Sequence[dict], timeout: float) -> List[Stream]:
    """All ``bodies`` at once, each in a thread of its own; their streams in order."""
    start = threading.Barrier(len(bodies))
    results: List = [None] * len(bodies)

    def ask(i: int) -> None:
        try:
            results[i] = stream_answer(port, bodies[i], start, timeout)
        except Exception as e:  # reported below, with the others' results discarded
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} streams failed: {errors[0]}")
    return results


@dataclass
class Round:
    """What N simultaneous streams measured (times in seconds)."""

    streams: int
    median_ttft: float
    ttft_spread: float
    decode_tps: float  # median over the streams
    aggregate_tps: float
    prompt_tokens: List[int]
    tokens: List[int]


def summarize(streams: Sequence[Stream]) -> Round:
    ttfts = [s.ttft for s in streams]
    elapsed = max(s.last for s in streams) - min(s.sent for s in streams)
    return Round(
        len(streams),
        statistics.median(ttfts),
        max(ttfts) - min(ttfts),
        statistics.median(s.decode_tps for s in streams),
        sum(s.tokens for s in streams) / elapsed,
        [s.prompt_tokens for s in streams],
        [s.tokens for s in streams],
    )


def serve_and_measure(
    server: Server, args, rounds: Dict[int, List[List[dict]]], warmup: List[dict]
) -> Dict[int, Round]:
    """A warm-up round, then per stream count its repeats; the repeat with the highest aggregate tokens/s."""
    run_round(server.port, warmup, args.request_timeout)
    best = {}
    for n, repeats in rounds.items():
        results = [summarize(run_round(server.port, bodies, args.request_timeout)) for bodies in repeats]
        best[n] = max(results, key=lambda r: r.aggregate_tps)
        print(f"  {n} streams: {best[n].aggregate_tps:.2f} tok/s in all", flush=True)
    return best


# The report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "–"


def side_table(title: str, results: Dict[str, Dict[int, Round]]) -> List[str]:
    lines = [
        f"\n{title}\n",
        "| streams | server | prompt tokens | tokens per stream | median TTFT s | TTFT spread s | decode tok/s per "
        "stream | aggregate tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, rounds in results.items():
        for n, r in rounds.items():
            prompts = "/".join(map(str, sorted(set(r.prompt_tokens))))
            tokens = "/".join(map(str, sorted(set(r.tokens))))
            lines.append(
                f"| {n} | {side} | {prompts} | {tokens} | {r.median_ttft:.3f} | {r.ttft_spread:.3f} | "
                f"{r.decode_tps:.2f} | {r.aggregate_tps:.2f} |"
            )
    return lines


def ratio_table(eve: Dict[int, Round], lm: Dict[int, Round]) -> List[str]:
    lines = [
        "\nmlx-eve ÷ mlx-lm (tokens/s: above 1 is faster; TTFT: below 1 is faster)\n",
        "| streams | aggregate tok/s | decode tok/s per stream | median TTFT | TTFT spread |",
        "|---|---|---|---|---|",
    ]
    for n in eve:
        e, m = eve[n], lm[n]
        lines.append(
            f"| {n} | {ratio(e.aggregate_tps, m.aggregate_tps)} | {ratio(e.decode_tps, m.decode_tps)} | "
            f"{ratio(e.median_ttft, m.median_ttft)} | {ratio(e.ttft_spread, m.ttft_spread)} |"
        )
    return lines


def token_count_problems(results: Dict[str, Dict[int, Round]], max_tokens: int) -> List[str]:
    """Where the two sides' prompts or answers differ in length, or an answer stopped before ``max_tokens``."""
    problems = []
    eve, lm = results["mlx-eve"], results["mlx-lm"]
    for n in eve:
        if eve[n].prompt_tokens != lm[n].prompt_tokens:
            problems.append(
                f"{n} streams: prompt tokens differ: mlx-eve {eve[n].prompt_tokens}, mlx-lm {lm[n].prompt_tokens}"
            )
        for side, r in results.items():
            if any(t != max_tokens for t in r[n].tokens):
                problems.append(f"{n} streams: {side} generated {r[n].tokens} tokens, not {max_tokens} each")
    return problems


def build_parser() -> ArgumentParser:
    shapes = "".join(f"  {name:8s} {SHAPES[name].description}\n" for name in EVE_SHAPES)
    p = ArgumentParser(
        description="Benchmark mlx_eve.server against mlx_lm.server on the same random text weights, in one run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"shapes:\n{shapes}  (v2-tiny gets a 1024-token vocabulary here, for the byte-level tokenizer)\n\n"
            "On a CPU, MLX computes 16-bit weights slowly and mlx-eve loads them as float32 while mlx-lm keeps them:\n"
            "compare float32 there (with OpenBLAS preloaded on Linux)."
        ),
    )
    add = p.add_argument
    add("--shape", default="v2-0.5b", choices=EVE_SHAPES, help="Model shape (default v2-0.5b).")
    add("--layers", type=COUNT, default=None, help="Decoder layers to build, each of real shape (default: all).")
    add("--dtype", default="float32", choices=list(DTYPES), help="Weight dtype (default float32).")
    add("--streams", nargs="+", type=COUNT, default=[1, 4, 8], help="Simultaneous streams (default 1 4 8).")
    add(
        "--image-streams",
        nargs="*",
        type=COUNT,
        default=None,
        help="mlx-eve alone: simultaneous streams with an image each (default: --streams; no values: none).",
    )
    add("--image-size", type=COUNT, default=448, help="Side of each square image in pixels (default 448).")
    add("--prompt-tokens", type=COUNT, default=108, help="Text tokens of each question (default 108).")
    add("--max-tokens", type=COUNT, default=64, help="Tokens generated per stream (default 64).")
    add("--repeats", type=COUNT, default=1, help="Rounds per stream count; the fastest is reported (default 1).")
    add("--work-dir", type=Path, default=None, help="Where to write the models, kept (default: a temporary folder).")
    add("--seed", type=SEED, default=0)
    add("--start-timeout", type=COUNT, default=600, help="Seconds a server may take to start (default 600).")
    add("--request-timeout", type=COUNT, default=1800, help="Seconds a stream may stay silent (default 1800).")
    add("--json", type=Path, default=None, help="Also write the results to this JSON file.")
    return p


def question(tokenizer, args: argparse.Namespace, rng, image: bool, max_tokens: Optional[int] = None) -> dict:
    """A request body with a question of its own (and an image of its own, with ``image``)."""
    uri = image_uri(args.image_size, rng) if image else None
    text = prompt_text(tokenizer, args.prompt_tokens, rng)
    return request_body(text, max_tokens or args.max_tokens, end_token_ids(tokenizer), uri)


def plan_rounds(tokenizer, counts: Sequence[int], args, rng, image: bool) -> Dict[int, List[List[dict]]]:
    """Per stream count, ``--repeats`` rounds of request bodies."""
    return {n: [[question(tokenizer, args, rng, image) for _ in range(n)] for _ in range(args.repeats)] for n in counts}


def measure_servers(args: argparse.Namespace, built: dict, image_counts: Sequence[int], work: Path) -> tuple:
    """Each server started alone, warmed up and measured: (text rounds per side, mlx-eve's image rounds)."""
    rng = np.random.default_rng(args.seed)
    tokenizer, most = built["tokenizer"], max([*args.streams, *image_counts])
    text_rounds = plan_rounds(tokenizer, args.streams, args, rng, image=False)
    image_rounds = plan_rounds(tokenizer, image_counts, args, rng, image=True)
    text_warmup = [question(tokenizer, args, rng, False, WARMUP_TOKENS) for _ in range(max(args.streams))]
    image_warmup = [question(tokenizer, args, rng, True, WARMUP_TOKENS)]
    servers = {
        "mlx-eve": ("mlx_eve.server", ["--max-batch-size", str(most), "--prompt-cache-bytes", "0"]),
        "mlx-lm": (
            "mlx_lm.server",
            ["--prompt-cache-size", "0", "--prompt-concurrency", str(most), "--decode-concurrency", str(most)],
        ),
    }
    results, image_results = {}, {}
    for side, (module, flags) in servers.items():
        print(f"{side}: starting {module} ...", flush=True)
        server = Server(module, built["folders"][side], flags, work / f"{side}.log", args.start_timeout)
        try:
            results[side] = serve_and_measure(server, args, text_rounds, text_warmup)
            if side == "mlx-eve" and image_rounds:
                print("mlx-eve: streams with an image each", flush=True)
                image_results = serve_and_measure(server, args, image_rounds, image_warmup)
        finally:
            server.stop()
    return results, image_results


def report(args: argparse.Namespace, config: dict, results: dict, image_results: dict, problems: List[str]) -> str:
    lines = [
        f"\n{args.shape}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocabulary "
        f"{config['vocab_size']}, {args.dtype}; {args.prompt_tokens} question tokens, {args.max_tokens} tokens per "
        f"stream, greedy; fastest of {args.repeats} round(s)",
        *side_table("Text questions", results),
        *ratio_table(results["mlx-eve"], results["mlx-lm"]),
    ]
    if image_results:
        title = f"mlx-eve alone (mlx-lm has no image path): a {args.image_size}² image and the question per stream"
        lines += side_table(title, {"mlx-eve": image_results})
    counts = "; ".join(problems) if problems else "the same on both sides, every answer full"
    lines.append(f"\nToken counts: {counts}")
    lines.append(f"Machine: {machine()}; load average at the end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.work_dir is not None and args.work_dir.exists() and not args.work_dir.is_dir():
        parser.error(f"argument --work-dir: {args.work_dir} is not a folder")
    image_counts = args.streams if args.image_streams is None else args.image_streams
    print(f"mlx-eve serving benchmark on {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="eve-serving-bench-"))
    try:
        print(f"Writing the {args.shape} models ({args.dtype}) to {work} ...", flush=True)
        built = write_folders(args.shape, args.layers, args.dtype, args.image_size, work)
        mx.clear_cache()  # the benchmark's own copy of the weights is gone: hand its memory back
        results, image_results = measure_servers(args, built, image_counts, work)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    problems = token_count_problems(results, args.max_tokens)
    print(report(args, built["config"], results, image_results, problems))
    if args.json:
        summary = {
            "machine": machine(),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "text": {side: {n: asdict(r) for n, r in rounds.items()} for side, rounds in results.items()},
            "image": {n: asdict(r) for n, r in image_results.items()},
            "token_count_problems": problems,
        }
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
