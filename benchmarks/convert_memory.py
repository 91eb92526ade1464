"""Peak memory and throughput of ``convert`` on a synthetic multi-GB EVEv2 checkpoint.

Writes a random bfloat16 checkpoint in the original layout (sharded safetensors, PyTorch conv layout,
text and ``moe_*`` copies), converts it in a child process, and prints the child's peak resident memory
divided by the checkpoint size (target for 4-bit: at most 0.4) and the conversion throughput.

    python benchmarks/convert_memory.py --size-gb 4.5 --shards 4 --bits 4
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_checkpoints import v2_config, v2_preprocessor, write_v2_tokenizer  # noqa: E402

from mlx_eve.shard_writer import ShardWriter, TensorSpec, shard_names  # noqa: E402


def checkpoint_specs(config: dict):
    """Names and shapes of an original EVEv2 checkpoint with this config (biases and norms included)."""
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]  # noqa: E741
    H, KV, C = config["num_attention_heads"], config["num_key_value_heads"], config["mm_hidden_size"]
    hd = D // H
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    t = "model.vision_tower."
    shapes.update({t + "patch_embedding.0.weight": (C, 3, 16, 16), t + "patch_embedding.0.bias": (C,)})
    shapes.update({t + "patch_embedding.2.weight": (D, C, 2, 2), t + "patch_embedding.2.bias": (D,)})
    shapes.update({t + "class_embedding": (D,), t + "split_embedding": (D,)})
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for copy in ("", "moe_"):
            for name, out in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
                shapes[f"{p}self_attn.{copy}{name}_proj.weight"] = (out, D)
                shapes[f"{p}self_attn.{copy}{name}_proj.bias"] = (out,)
            shapes[f"{p}self_attn.{copy}o_proj.weight"] = (D, H * hd)
            mlp = f"{p}{copy}mlp." if copy else f"{p}mlp."
            shapes.update(
                {mlp + "gate_proj.weight": (I, D), mlp + "up_proj.weight": (I, D), mlp + "down_proj.weight": (D, I)}
            )
            shapes[f"{p}{copy}input_layernorm.weight"] = (D,)
            shapes[f"{p}{copy}post_attention_layernorm.weight"] = (D,)
    return [TensorSpec(k, s, mx.bfloat16) for k, s in shapes.items()]


def write_checkpoint(path: Path, size_gb: float, shards: int) -> int:
    config = v2_config(
        hidden_size=2048,
        intermediate_size=11008,
        num_attention_heads=16,
        num_key_value_heads=2,
        mm_hidden_size=1024,
        vocab_size=32000,
        num_hidden_layers=1,
        torch_dtype="bfloat16",
    )
    per_layer = sum(s.nbytes for s in checkpoint_specs(config)) - sum(
        s.nbytes for s in checkpoint_specs({**config, "num_hidden_layers": 0})
    )
    config["num_hidden_layers"] = max(
        1, round((size_gb * 1e9 - (sum(s.nbytes for s in checkpoint_specs(config)) - per_layer)) / per_layer)
    )
    specs = checkpoint_specs(config)
    total = sum(s.nbytes for s in specs)
    path.mkdir(parents=True)
    groups, position = [[] for _ in range(shards)], 0
    for spec in specs:  # exactly `shards` files of about equal size
        groups[min(position * shards // total, shards - 1)].append(spec)
        position += spec.nbytes
    names = shard_names(shards)
    weight_map = {}
    for name, group in zip(names, groups):
        writer = ShardWriter(path / name, group, {"format": "pt"})
        for spec in group:
            array = (mx.random.normal(spec.shape) * 0.02).astype(mx.bfloat16)
            mx.eval(array)
            writer.write(spec.name, array)
            weight_map[spec.name] = name
        writer.close()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(v2_preprocessor()))
    write_v2_tokenizer(path)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.5, help="Checkpoint size to synthesise (default 4.5 GB).")
    parser.add_argument("--shards", type=int, default=4, help="Number of input shards (default 4).")
    parser.add_argument("--bits", type=int, default=4, help="Quantization bits (default 4; 0 converts to float16).")
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write (default: a temporary folder).")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="eve-convert-bench-"))
    try:
        source, target = work / "original", work / "mlx"
        print(f"Writing a synthetic {args.size_gb} GB EVEv2 checkpoint in {args.shards} shards to {source} ...")
        size = write_checkpoint(source, args.size_gb, args.shards)
        command = [sys.executable, "-m", "mlx_eve.convert", "--hf-path", str(source), "--mlx-path", str(target)]
        command += ["-q", "--q-bits", str(args.bits)] if args.bits else ["--dtype", "float16"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        # ru_maxrss of waited-for children: kilobytes on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        output = sum(f.stat().st_size for f in target.glob("*.safetensors"))
        print(f"checkpoint        {size / 1e9:.2f} GB in {len(list(source.glob('*.safetensors')))} shards")
        print(f"output            {output / 1e9:.2f} GB ({'%d-bit' % args.bits if args.bits else 'float16'})")
        print(f"peak RSS          {peak / 1e9:.2f} GB")
        print(f"peak RSS / size   {peak / size:.3f}   (target <= 0.4 for 4-bit)")
        print(f"time              {seconds:.1f} s, {size / 1e9 / seconds:.3f} GB/s of checkpoint")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
