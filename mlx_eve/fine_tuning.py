"""A fine-tuning run as ``mlx_eve.lora`` describes it: load the model and data, prepare what trains (LoRA, DoRA or
every weight), train and/or test, and keep the adapter config beside the adapters."""

import json
import math
import types
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.tuner.trainer import grad_checkpoint

from .adapters import load_adapters, prepare_model
from .data import DataError, load_splits
from .errors import EVEError
from .loading import load
from .models.base import EVEModel
from .trainer import evaluate, find_checkpoint, loss_sum, parameter_counts, train, training_args

# What must match between a run and the checkpoint it resumes.
STRUCTURE = [
    "fine_tune_type",
    "targets",
    "train_patch_embedding",
    "freeze_patch_embedding",
    "num_layers",
    "lora_rank",
    "lora_scale",
    "model",
]


def adapter_config(args: types.SimpleNamespace, model: EVEModel) -> dict:
    """mlx-lm's adapter schema (fine_tune_type, num_layers, lora_parameters with keys) plus our options."""
    family = model.family
    targets = args.targets or family.default_targets
    if targets not in family.lora_targets:
        choices = ", ".join(family.lora_targets)
        raise EVEError(f"{family.name} has no --targets {targets}: choose {choices}.")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(targets=targets, base_model=args.model)
    config["lora_parameters"] = {
        "rank": args.lora_rank,
        "scale": args.lora_scale,
        "dropout": args.lora_dropout,
        "keys": list(family.lora_targets[targets]),
    }
    return config


def fine_tune(args: types.SimpleNamespace, loss: Optional[Callable] = None) -> None:
    """Train and/or test as ``args`` say; ``loss`` replaces the answer loss in training (``trainer.train``)."""
    group = mx.distributed.init()
    say = print if group.rank() == 0 else (lambda *a, **k: None)
    say(f"Loading {args.model}")
    model, processor = load(args.model, max_size=args.max_size)
    say(f"Loading data from {args.data}")
    splits = load_splits(args.data, processor, args.max_seq_length, args.image_folder)
    adapter_path = Path(args.adapter_path)
    config = adapter_config(args, model)
    if args.train:
        if "train" not in splits:
            raise DataError(f"No training split in {args.data}.")
        if args.resume:
            if find_checkpoint(adapter_path) is None:
                raise EVEError(
                    f"Nothing to resume: {adapter_path} holds no checkpoint. Leave out --resume to start anew."
                )
            saved = (
                json.loads((adapter_path / "adapter_config.json").read_text())
                if (adapter_path / "adapter_config.json").exists()
                else {}
            )
            changed = [k for k in STRUCTURE if saved.get(k) != config.get(k)]
            if changed:
                raise EVEError(f"Cannot resume: {', '.join(changed)} differ from the run in {adapter_path}.")
        prepare_model(model, config)
        if args.resume_adapter_file:
            model.load_weights(str(args.resume_adapter_file), strict=False)
        if args.grad_checkpoint:
            grad_checkpoint(model.layers[0])  # every decoder layer: they share the class
        trainable, total = parameter_counts(model)
        say(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
        if group.rank() == 0:
            adapter_path.mkdir(parents=True, exist_ok=True)
            (adapter_path / "adapter_config.json").write_text(json.dumps(config, indent=2))
        training = training_args(args)
        last = train(
            model,
            processor.image_processor,
            splits["train"],
            splits.get("valid"),
            training,
            adapter_path,
            resume=args.resume,
            report=say,
            loss=loss or loss_sum,
        )
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
