"""Fine-tune EVE on image+conversation data: LoRA, DoRA, QLoRA (LoRA on a quantized model) or full.

    python -m mlx_eve.lora --model BAAI/EVE-7B-HD-v2.0 --train --data my_data/ --iters 600

Every option can also come from a YAML file (``-c config.yaml``, keys as the long option names with
underscores); options given on the command line win. Several machines: ``mlx.launch ... mlx_eve.lora ...``.
"""

import argparse
import json
import math
import sys
import types
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten

from .adapters import load_adapters, make_trainable
from .data import DataError, load_splits
from .errors import EVEError, run_cli
from .generate import BUNDLED_MODEL
from .loading import load
from .models.base import EVEModel
from .trainer import TrainingArgs, evaluate, train

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# LoRA target modules inside each decoder layer. EVEv2's visual branch is its `moe_*` copy.
TARGETS = {
    "text": [f"self_attn.{n}" for n in ATTENTION] + [f"mlp.{n}" for n in MLP],
    "visual": [f"self_attn.moe_{n}" for n in ATTENTION] + [f"moe_mlp.{n}" for n in MLP],
}
TARGETS["both"] = TARGETS["text"] + TARGETS["visual"]
TARGETS["decoder"] = TARGETS["text"]

DEFAULTS = {
    "model": str(BUNDLED_MODEL),
    "train": False,
    "test": False,
    "data": "data",
    "image_folder": None,
    "fine_tune_type": "lora",
    "targets": None,  # v2: both, v1: decoder
    "train_patch_embedding": False,
    "freeze_patch_embedding": False,
    "num_layers": 16,
    "lora_rank": 8,
    "lora_scale": 20.0,
    "lora_dropout": 0.0,
    "batch_size": 4,
    "iters": 1000,
    "learning_rate": 1e-5,
    "patch_embedding_lr_scale": 1.0,
    "lr_schedule": "constant",
    "warmup": 0,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "max_grad_norm": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "max_seq_length": 2048,
    "max_size": None,
    "adapter_path": "adapters",
    "resume_adapter_file": None,
    "resume": False,
    "save_every": 100,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "val_batches": 25,
    "test_batches": 500,
    "seed": 0,
}
# What must match between a run and the checkpoint it resumes.
STRUCTURE = ["fine_tune_type", "targets", "train_patch_embedding", "freeze_patch_embedding", "num_layers", "lora_rank", "lora_scale", "model"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA, QLoRA or full fine-tuning of EVE models on image+text data.")
    add = p.add_argument
    add("--model", help=f"Model folder or Hugging Face repo; a 4-bit one gives QLoRA (default: {BUNDLED_MODEL.name}).")
    add("--train", action="store_true", default=None, help="Train.")
    add("--test", action="store_true", default=None, help="Report the loss on the test split.")
    add("--data", help="Folder with train/valid/test.jsonl, or one LLaVA .json/.jsonl file.")
    add("--image-folder", help="Where relative image paths point (default: next to the data file).")
    add("--fine-tune-type", choices=["lora", "dora", "full"], help="lora (default), dora or full.")
    add("--targets", choices=["text", "visual", "both", "decoder"], help="LoRA on EVEv2's text, visual (moe_*) or both branches (default both; EVEv1: decoder).")
    add("--train-patch-embedding", action="store_true", default=None, help="Also train the patch embedding layer fully.")
    add(
        "--freeze-patch-embedding",
        action="store_true",
        default=None,
        help="Full fine-tuning: keep the patch embedding (and EVEv1's projector) as it is.",
    )
    add("--num-layers", type=int, help="Adapt the last N decoder layers (-1: all; default 16).")
    add("--lora-rank", type=int, help="LoRA rank (default 8).")
    add("--lora-scale", type=float, help="LoRA scale (default 20).")
    add("--lora-dropout", type=float, help="LoRA dropout (default 0).")
    add("--batch-size", type=int, help="Global batch size (default 4).")
    add("--iters", type=int, help="Training steps (default 1000).")
    add("--learning-rate", type=float, help="Peak learning rate (default 1e-5).")
    add("--patch-embedding-lr-scale", type=float, help="The patch embedding's learning rate relative to the rest (default 1).")
    add("--lr-schedule", choices=["constant", "cosine", "linear"], help="After warm-up: constant, or decay to 10%% (cosine/linear).")
    add("--warmup", type=int, help="Linear warm-up steps (default 0).")
    add("--optimizer", choices=["adam", "adamw"], help="adam (default) or adamw.")
    add("--weight-decay", type=float, help="AdamW weight decay (default 0).")
    add("--max-grad-norm", type=float, help="Clip the gradient norm to this (default: no clipping).")
    add("--grad-checkpoint", action="store_true", default=None, help="Recompute layer activations to save memory.")
    add("--grad-accumulation-steps", type=int, help="Batches per optimizer update (default 1).")
    add("--max-seq-length", type=int, help="Longest sample in tokens, image tokens included (default 2048).")
    add("--max-size", type=int, help="EVEv2 training image resolution (default: the model's).")
    add("--adapter-path", help="Where adapters and checkpoints go (default ./adapters).")
    add("--resume-adapter-file", help="Start from these adapter weights (fresh optimizer).")
    add("--resume", action="store_true", default=None, help="Continue from the checkpoint in --adapter-path.")
    add("--save-every", type=int, help="Checkpoint every N steps (default 100).")
    add("--steps-per-report", type=int, help="Report the training loss every N steps (default 10).")
    add("--steps-per-eval", type=int, help="Validation loss every N steps (default 200).")
    add("--val-batches", type=int, help="Validation batches (-1: all; default 25).")
    add("--test-batches", type=int, help="Test batches (-1: all; default 500).")
    add("--seed", type=int, help="Random seed (default 0).")
    add("-c", "--config", help="YAML file with any of these options.")
    return p


def resolve_args(argv: Optional[List[str]] = None) -> types.SimpleNamespace:
    """Command line, then the YAML config, then the defaults."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    if config_file:
        config = yaml.safe_load(Path(config_file).read_text()) or {}
        lora = config.pop("lora_parameters", {})  # mlx-lm's nesting is accepted too
        config.update({f"lora_{k}": v for k, v in lora.items() if k in ("rank", "scale", "dropout")})
        unknown = sorted(set(config) - set(DEFAULTS))
        if unknown:
            raise EVEError(f"Unknown option(s) in {config_file}: {', '.join(unknown)}")
        args.update({k: v for k, v in config.items() if args.get(k) is None})
    return types.SimpleNamespace(**{k: DEFAULTS[k] if args.get(k) is None else args[k] for k in DEFAULTS})


def adapter_config(args: types.SimpleNamespace, model: EVEModel) -> dict:
    """mlx-lm's adapter schema (fine_tune_type, num_layers, lora_parameters with keys) plus our options."""
    targets = args.targets or ("both" if model.model_type == "eve-qwen2" else "decoder")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(targets=targets, base_model=args.model)
    config["lora_parameters"] = {
        "rank": args.lora_rank,
        "scale": args.lora_scale,
        "dropout": args.lora_dropout,
        "keys": TARGETS[targets],
    }
    return config


def prepare_model(model: EVEModel, config: dict) -> None:
    """Freeze the model and make exactly the chosen parameters trainable (LoRA weights drawn from the seed)."""
    mx.random.seed(config["seed"])
    if config["targets"] in ("visual", "both") and model.model_type != "eve-qwen2":
        raise EVEError("Only EVEv2 has a visual (moe_*) branch: use --targets decoder for EVEv1.")
    if config["fine_tune_type"] == "full" and any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise EVEError("Full fine-tuning needs a floating-point model; use LoRA (QLoRA) on a quantized one.")
    if config.get("freeze_patch_embedding") and (config["fine_tune_type"] != "full" or config["train_patch_embedding"]):
        raise EVEError("--freeze-patch-embedding goes with --fine-tune-type full, and not with --train-patch-embedding.")
    trains_patch_embedding = config["train_patch_embedding"] or (config["fine_tune_type"] == "full" and not config.get("freeze_patch_embedding"))
    if config.get("patch_embedding_lr_scale", 1.0) != 1.0 and not trains_patch_embedding:
        raise EVEError("--patch-embedding-lr-scale needs a trained patch embedding (--train-patch-embedding or full fine-tuning).")
    make_trainable(model, config)


def grad_checkpoint(model: EVEModel) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them."""
    cls = type(model.layers[0])
    call = cls.__call__

    def checkpointed(self, x, *args, **kwargs):
        def inner(params, x):
            self.update(params)
            return call(self, x, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    cls.__call__ = checkpointed


def run(args: types.SimpleNamespace) -> None:
    group = mx.distributed.init()
    say = print if group.rank() == 0 else (lambda *a, **k: None)
    say(f"Loading {args.model}")
    model, processor = load(args.model, max_size=args.max_size)
    say(f"Loading data from {args.data}")
    splits = load_splits(Path(args.data), processor, args.max_seq_length, args.image_folder and Path(args.image_folder))
    adapter_path = Path(args.adapter_path)
    config = adapter_config(args, model)
    if args.train:
        if "train" not in splits:
            raise DataError(f"No training split in {args.data}.")
        if args.resume:
            saved = json.loads((adapter_path / "adapter_config.json").read_text()) if (adapter_path / "adapter_config.json").exists() else {}
            changed = [k for k in STRUCTURE if saved.get(k) != config.get(k)]
            if changed:
                raise EVEError(f"Cannot resume: {', '.join(changed)} differ from the run in {adapter_path}.")
        prepare_model(model, config)
        if args.resume_adapter_file:
            model.load_weights(args.resume_adapter_file, strict=False)
        if args.grad_checkpoint:
            grad_checkpoint(model)
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
        say(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
        if group.rank() == 0:
            adapter_path.mkdir(parents=True, exist_ok=True)
            (adapter_path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        training = TrainingArgs(**{f: getattr(args, f) for f in TrainingArgs.__dataclass_fields__})
        last = train(model, processor.image_processor, splits["train"], splits.get("valid"), training, adapter_path, resume=args.resume, report=say)
        if last < training.iters:  # stopped by Ctrl-C, checkpoint saved: exit 130 so scripts do not carry on
            raise KeyboardInterrupt
    elif args.test and args.adapter_path and (adapter_path / "adapter_config.json").exists():
        model = load_adapters(model, str(adapter_path))
    if args.test:
        if "test" not in splits:
            raise DataError(f"No test split in {args.data}.")
        model.eval()
        loss = evaluate(model, splits["test"], processor.image_processor, args.batch_size, args.test_batches)
        say(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 50)):.3f}.")
    if not args.train and not args.test:
        raise EVEError("Nothing to do: pass --train and/or --test.")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(lambda: run(resolve_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
