"""Train a small EVEv2-architecture model from scratch on the shapes dataset, with mlx-eve's own
fine-tuning code, and write it where the README's first command and the demo app look for it.

    python examples/shapes/train.py --work data/shapes-run --out mlx_eve/assets/eve-shapes

Steps (each printed as it runs, all resumable by re-running with the same --work):
1. generate the dataset (examples/shapes/make_dataset.py);
2. train a byte-level BPE tokenizer on its text (Qwen2's pre-tokenizer and special tokens);
3. write a randomly initialised EVEv2 checkpoint (text and visual branch in every layer);
4. train every parameter with ``python -m mlx_eve.lora --fine-tune-type full``;
5. merge (``python -m mlx_eve.fuse``), store in float16 (``convert.py``), and score the held-out test split.

``--init MODEL`` skips 2–3 and continues training MODEL (a new learning-rate cycle, e.g. on new images
from another ``--seed``), at ``--max-size`` if given (a copy of MODEL with that resolution).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import mlx.core as mx
from mlx.utils import tree_flatten

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import make_dataset  # noqa: E402

# Where this script's dataset differs from make_dataset.py's defaults: more questions per image, close-ups, and a
# larger test split.
DATASET_DEFAULTS = {"train": 20000, "valid": 500, "test": 1000, "train_turns": 4, "close_ups": 0.25}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    done = subprocess.run([sys.executable, *command], cwd=ROOT)
    if done.returncode:  # e.g. Ctrl-C during training (checkpoint saved): re-run this script to resume
        sys.exit(done.returncode)


def train_tokenizer(data: Path, out: Path, vocab_size: int) -> int:
    """Qwen2-style byte-level BPE trained on the dataset's questions and answers plus the prompt template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [SYSTEM, "USER: ASSISTANT:"]
    for line in (data / "train.jsonl").read_text().splitlines():
        texts += [turn["value"] for turn in json.loads(line)["conversations"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    base = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(base + i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL)
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [base + 2, base], "do_sample": False}, indent=2)
    )
    return base + len(SPECIAL)


def initial_checkpoint(out: Path, data: Path, args: argparse.Namespace) -> None:
    from mlx_eve.loading import build_model

    out.mkdir(parents=True, exist_ok=True)
    tokens = train_tokenizer(data, out, args.vocab_size)
    config = {
        "model_type": "eve-qwen2",
        "architectures": ["EVEQwen2ForCausalLM"],
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden_size // 64,
        "num_key_value_heads": max(args.hidden_size // 128, 1),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": -(-tokens // 64) * 64,
        "tie_word_embeddings": False,
        "mm_hidden_size": args.hidden_size // 2,
        "mm_vision_tower": f"openai/eve-anyratio-res{args.max_size}-patch16",
        "add_moe": True,
        "moe_part": "layernorm-self_attn-mlp",
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "image_processor_type": "AnyRatioProcessor",
        "max_size": args.max_size,
        "patch_stride": 16,
        "dense_stride": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    mx.random.seed(args.seed)
    model = build_model(config, {"patch_stride": 16, "dense_stride": 2})
    tower = model.model.vision_tower
    tower.class_embedding = mx.random.normal(tower.class_embedding.shape) * 0.02
    tower.split_embedding = mx.random.normal(tower.split_embedding.shape) * 0.02
    model.model.embed_tokens.weight = mx.random.normal(model.model.embed_tokens.weight.shape) * 0.02
    mx.save_safetensors(
        str(out / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"Initial model: {parameters / 1e6:.2f}M parameters, {tokens} tokens, images at {args.max_size}px", flush=True
    )


def at_resolution(model: Path, max_size: int, out: Path) -> Path:
    """``model`` itself, or a copy in ``out`` that reads images at ``max_size`` (EVEv2's patch embedding has no
    position table, so the same weights serve any resolution)."""
    from mlx_eve.saving import staged_folder

    preprocessor = json.loads((model / "preprocessor_config.json").read_text())
    if preprocessor["max_size"] == max_size:
        return model
    if not out.exists():
        with staged_folder(out) as staged:
            shutil.copytree(model, staged, dirs_exist_ok=True)
            (staged / "preprocessor_config.json").write_text(
                json.dumps({**preprocessor, "max_size": max_size}, indent=2)
            )
            config = json.loads((model / "config.json").read_text())
            config["mm_vision_tower"] = re.sub(r"res\d+", f"res{max_size}", config["mm_vision_tower"])
            (staged / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_parser() -> argparse.ArgumentParser:
    """make_dataset.py's options (but --out, here the finished model) for the dataset it draws, then its own."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        parents=[make_dataset.build_parser(add_help=False)],
        conflict_handler="resolve",
    )
    p.add_argument("--work", type=Path, default=ROOT / "data" / "shapes-run", help="Dataset, checkpoints and logs.")
    p.add_argument("--out", type=Path, default=ROOT / "mlx_eve" / "assets" / "eve-shapes", help="The finished model.")
    p.add_argument("--train-samples", dest="train", type=int, help="make_dataset.py's --train.")
    p.add_argument(
        "--column-loss",
        type=float,
        default=0.0,
        help="Weight of the auxiliary loss that teaches image tokens their column (column_loss.py; 0: none).",
    )
    p.add_argument(
        "--binding-loss",
        type=float,
        default=0.0,
        help="Weight of the auxiliary loss that points the last layer's attention at the shape a position "
        "question names (column_loss.py; 0: none).",
    )
    p.add_argument(
        "--start-loss",
        type=float,
        default=0.0,
        help="Weight of the auxiliary loss that teaches each shape's first image token that it starts a shape "
        "(column_loss.py; 0: none).",
    )
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    # At 1e-3 the loss of shape questions stays at the answer prior, even on close-ups alone.
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=640, help="BPE merges target (before special tokens).")
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="Image resolution, about max-size² pixels (default: the --init model's; 160 for a new model).",
    )
    p.add_argument("--init", type=Path, default=None, help="Continue training this model instead of a new one.")
    p.set_defaults(**DATASET_DEFAULTS)
    return p


def dataset_flags(args: argparse.Namespace, data: Path) -> List[str]:
    """make_dataset.py's command line for ``args``: each of its options as given here, its --out ``data``."""
    flags = ["--out", str(data)]
    for dest in vars(make_dataset.build_parser().parse_args(["--out", str(data)])):
        value = getattr(args, dest)
        if dest != "out":
            flags += ["--" + dest.replace("_", "-"), *map(str, value if isinstance(value, list) else [value])]
    return flags


def main() -> None:
    args = build_parser().parse_args()
    data, run_dir, fused = args.work / "data", args.work / "run", args.work / "fused"
    init = args.work / "init"

    if not (data / "test.jsonl").exists():
        run(str(HERE / "make_dataset.py"), *dataset_flags(args, data))
    if args.init:
        init = at_resolution(args.init, args.max_size, init) if args.max_size else args.init
    elif not (init / "config.json").exists():
        args.max_size = args.max_size or 160
        initial_checkpoint(init, data, args)
    resume = ["--resume"] if (run_dir / "checkpoint" / "state.json").exists() else []
    column_loss = [str(HERE / "column_loss.py"), "--column-loss", str(args.column_loss)]
    column_loss += ["--binding-loss", str(args.binding_loss), "--start-loss", str(args.start_loss)]
    run(
        *(column_loss if args.column_loss or args.binding_loss or args.start_loss else ["-m", "mlx_eve.lora"]),
        "--model",
        str(init),
        "--train",
        "--data",
        str(data),
        "--fine-tune-type",
        "full",
        "--train-patch-embedding",
        "--batch-size",
        str(args.batch_size),
        "--iters",
        str(args.iters),
        "--learning-rate",
        str(args.learning_rate),
        "--lr-schedule",
        "cosine",
        "--warmup",
        str(min(200, args.iters // 10)),
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.01",
        "--max-grad-norm",
        "1.0",
        "--steps-per-report",
        "50",
        "--steps-per-eval",
        "500",
        "--val-batches",
        "8",
        "--save-every",
        "250",
        "--adapter-path",
        str(run_dir),
        "--seed",
        str(args.seed),
        *resume,
    )
    run(
        "-m", "mlx_eve.fuse", "--model", str(init), "--adapter-path", str(run_dir), "--save-path", str(fused), "--force"
    )
    run("convert.py", "--hf-path", str(fused), "--mlx-path", str(args.out), "--dtype", "float16", "--force")
    run(str(HERE / "evaluate.py"), "--model", str(args.out), "--data", str(data), "--split", "test")


if __name__ == "__main__":
    main()
