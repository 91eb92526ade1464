"""What quantization costs the bundled demo model: accuracy on its held-out test images, size on disk, and the
peak memory and time of quantizing, for plain round-to-nearest and each learned method (AWQ, GPTQ, DWQ,
dynamic bits), all calibrated on shapes images that are not in the test set.

    python benchmarks/quantization_quality.py --work /tmp/quant-quality
    python benchmarks/quantization_quality.py --eve-v2-7b     # the weights' size of each setting for EVEv2-7B

Each model and each score is kept in ``--work`` (``results.json``): a run that stops goes on where it was.
Prints the table of README's "What quantization costs".
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "mlx_eve" / "assets" / "eve-shapes"
CATEGORIES = ["colour", "count", "position", "shape"]
CALIBRATION = ["--data-path", "{calib}", "--num-samples", "256"]
DWQ = ["--data-path", "{calib}", "--num-samples", "512", "--batch-size", "4"]
# A student far from the float model (2-bit rounding) takes 1e-4; one close to it (3-bit rounding, GPTQ's 2 bits)
# had its validation loss raised by that, so it takes 1e-5.
LEARNING_RATE = {"far": ["--learning-rate", "1e-4"], "close": ["--learning-rate", "1e-5"]}

# name → (what it is, the command that makes it; None: the bundled model itself)
MODELS = {
    "float16": ("float16 (bundled)", None),
    "rtn-8": ("8-bit", ["mlx_eve.convert", "--hf-path", "{demo}", "-q", "--q-bits", "8"]),
    "rtn-4": ("4-bit", ["mlx_eve.convert", "--hf-path", "{demo}", "-q", "--q-bits", "4"]),
    "rtn-3": ("3-bit", ["mlx_eve.convert", "--hf-path", "{demo}", "-q", "--q-bits", "3"]),
    "rtn-2": ("2-bit", ["mlx_eve.convert", "--hf-path", "{demo}", "-q", "--q-bits", "2"]),
    "mixed_2_6": (
        "mixed_2_6 recipe",
        ["mlx_eve.convert", "--hf-path", "{demo}", "-q", "--quant-predicate", "mixed_2_6"],
    ),
    "awq-3": ("AWQ 3-bit", ["mlx_eve.awq", "--model", "{demo}", "--bits", "3", *CALIBRATION]),
    "awq-2": ("AWQ 2-bit", ["mlx_eve.awq", "--model", "{demo}", "--bits", "2", *CALIBRATION]),
    "gptq-3": ("GPTQ 3-bit", ["mlx_eve.gptq", "--model", "{demo}", "--bits", "3", *CALIBRATION]),
    "gptq-2": ("GPTQ 2-bit", ["mlx_eve.gptq", "--model", "{demo}", "--bits", "2", *CALIBRATION]),
    "dwq-3": ("DWQ 3-bit", ["mlx_eve.dwq", "--model", "{demo}", "--bits", "3", *DWQ, *LEARNING_RATE["close"]]),
    "dwq-2": ("DWQ 2-bit", ["mlx_eve.dwq", "--model", "{demo}", "--bits", "2", *DWQ, *LEARNING_RATE["far"]]),
    "dynamic-3-4": (
        "dynamic 3/4 bits, 4.0 bpw",
        ["mlx_eve.dynamic_quant", "--model", "{demo}", "--low-bits", "3", "--high-bits", "4"]
        + ["--target-bpw", "4.0", *CALIBRATION],
    ),
    "dynamic-2-4": (
        "dynamic 2/4 bits, 3.0 bpw",
        ["mlx_eve.dynamic_quant", "--model", "{demo}", "--low-bits", "2", "--high-bits", "4"]
        + ["--target-bpw", "3.0", *CALIBRATION],
    ),
    "gptq-dwq-2": (
        "GPTQ then DWQ 2-bit",
        ["mlx_eve.dwq", "--model", "{demo}", "--quantized-model", "{work}/gptq-2", *DWQ, *LEARNING_RATE["close"]],
    ),
}
# The learned methods first; the rest of the table after.
RUN_ORDER = ["gptq-2", "gptq-3", "awq-2", "awq-3", "dwq-2", "dwq-3", "dynamic-2-4", "dynamic-3-4", "rtn-2", "rtn-3"]
RUN_ORDER += ["gptq-dwq-2", "mixed_2_6", "float16", "rtn-4", "rtn-8"]


def run(command: list, log: Path) -> tuple:
    """Run a child to its end, its output in ``log``: (seconds, its peak resident memory in bytes)."""
    tic = time.perf_counter()
    with open(log, "wb") as out:
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed; its output is in {log}")
    return time.perf_counter() - tic, usage.ru_maxrss * 1024


def make_data(work: Path) -> dict:
    """The test set of the demo model's card (seed 3), and calibration data from another seed."""
    maker = [sys.executable, str(ROOT / "examples" / "shapes" / "make_dataset.py")]
    paths, log = {"eval": work / "eval", "calib": work / "calib"}, work / "data.log"
    sizes = {"eval": ["--train", "4", "--valid", "4", "--test", "1000", "--seed", "3"]}
    sizes["calib"] = ["--train", "512", "--valid", "64", "--test", "1", "--seed", "5"]
    for name, size in sizes.items():
        if not (paths[name] / "valid.jsonl").exists():
            run(maker + ["--out", str(paths[name]), *size], log)
    return paths


def score(predictions: Path) -> dict:
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    accuracy = {c: [x["correct"] for x in lines if x.get("category") == c] for c in CATEGORIES}
    result = {c: 100 * sum(v) / len(v) for c, v in accuracy.items() if v}
    result["overall"] = 100 * sum(x["correct"] for x in lines) / len(lines)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/quant-quality"))
    p.add_argument("--only", nargs="*", choices=list(MODELS), help="Build and score only these.")
    p.add_argument("--eve-v2-7b", action="store_true", help="Print what each setting weighs for EVEv2-7B instead.")
    args = p.parse_args()
    if args.eve_v2_7b:
        return print_eve_v2_7b_sizes()
    args.work.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.only or RUN_ORDER:
        label, command = MODELS[name]
        row = results.setdefault(name, {})
        folder = DEMO if command is None else args.work / name
        if command is not None and "quantize_s" not in row:
            fill = {"demo": str(DEMO), "calib": str(data["calib"]), "work": str(args.work)}
            argv = [a.format(**fill) for a in command]
            log = args.work / f"{name}.log"
            build = [sys.executable, "-m", *argv, "--mlx-path", str(folder), "--force"]
            row["quantize_s"], row["quantize_peak"] = run(build, log)
            row["command"] = "python -m " + " ".join(argv)
        if "overall" not in row:
            predictions = args.work / f"{name}.predictions.jsonl"
            command = ["mlx_eve.evaluate", "--model", str(folder), "--data", str(data["eval"])]
            log = args.work / f"{name}.evaluate.log"
            row["evaluate_s"], _ = run([sys.executable, "-m", *command, "--output", str(predictions)], log)
            row.update(score(predictions))
        row["disk"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        results_file.write_text(json.dumps(results, indent=1))
        print(f"{label}: {row['overall']:.1f} %", flush=True)
    print_table(results)


def print_table(results: dict) -> None:
    base = results.get("float16", {}).get("overall")
    print("| model | " + " | ".join(CATEGORIES) + " | overall | points lost | on disk | peak memory | time |")
    print("|---" * (len(CATEGORIES) + 6) + "|")
    for name, (label, _) in MODELS.items():
        row = results.get(name)
        if not row or "overall" not in row:
            continue
        lost = "—" if base is None or name == "float16" else f"{base - row['overall']:.1f}"
        cells = [f"{row.get(c, 0):.1f} %" for c in CATEGORIES] + [f"{row['overall']:.1f} %", lost]
        cells.append(f"{row['disk'] / 1e6:.1f} MB")
        if "quantize_s" in row:
            cells += [f"{row['quantize_peak'] / 2**20:.0f} MB", f"{row['quantize_s']:.0f} s"]
        else:
            cells += ["—", "—"]
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_eve_v2_7b_sizes() -> None:
    """The weights of EVEv2-7B (Qwen2.5-7B with a visual copy of every layer: hidden 3584, 28 layers, 4 KV heads) in
    each setting: each layer's stored arrays as the real quantization code lays them out, without computing any."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoints import v2_config

    from mlx_eve import quantization
    from mlx_eve.loading import build_model

    config = v2_config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28)
    config.update(num_key_value_heads=4, vocab_size=152064, mm_hidden_size=1024)

    def layout(bits: int, recipe=None, ends=None) -> Callable:
        def apply(model):
            layers = quantization.plan(model, bits, 64, recipe, model.family.patch_embedding_paths)
            for path, params in (ends or {}).items():
                layers[path] = {"mode": "affine", **params}
            quantization.apply(model, layers)

        return apply

    awq_ends = {p: {"bits": 4, "group_size": 32} for p in ("model.embed_tokens", "lm_head")}
    gptq_ends = {"model.embed_tokens": {"bits": 6, "group_size": 64}}
    settings = {"float16": None, "8-bit": layout(8), "4-bit": layout(4), "3-bit (and DWQ)": layout(3)}
    settings.update({"2-bit (and DWQ)": layout(2), "mixed_2_6": layout(2, "mixed_2_6")})
    settings.update({f"AWQ {b}-bit": layout(b, ends=awq_ends) for b in (3, 2)})
    settings.update({f"GPTQ {b}-bit": layout(b, ends=gptq_ends) for b in (3, 2)})
    print("| EVEv2-7B | weights | bits per weight |")
    print("|---|---|---|")
    count = None
    for name, apply in settings.items():
        model = build_model(config, {"patch_stride": 16, "dense_stride": 2})
        model.set_dtype(mx.float16)
        count = count or sum(a.size for _, a in tree_flatten(model.parameters()))  # the float model's weights
        if apply:
            apply(model)
        size = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
        print(f"| {name} | {size / 1e9:.2f} GB | {8 * size / count:.2f} |")


if __name__ == "__main__":
    main()
