"""Writing an MLX model folder (mlx-lm's layout): safetensors shards of at most 5 GB with their index,
``config.json``, the tokenizer and image-processor files, ``generation_config.json`` and a model card.

Everything is written into a hidden ``.<name>.incomplete-<pid>`` folder first and renamed into place only
when complete, so an interrupted or failed save never leaves a folder that looks finished.
"""

import glob
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from .errors import EVEError
from .loading import HUB_REPO_ID
from .quantization import config_block, of_model
from .shard_writer import ShardWriter, TensorSpec, plan_shards, shard_names

MAX_SHARD_BYTES = 5 * 2**30


class OutputExistsError(EVEError, FileExistsError):
    pass


def check_output(out: Path, force: bool, keep: Sequence[Path] = ()) -> None:
    """Refuse an output folder whose replacement would lose something: any non-empty ``out`` without
    ``force``; with it, anything but a model folder, and a folder that is, or contains, one of ``keep``
    (the model and adapters being read)."""
    out = Path(out).expanduser()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists and is not empty; pass --force to replace it.")
    target = out.resolve()
    for path in keep:
        kept = Path(path).expanduser().resolve()
        if kept == target or target in kept.parents:
            raise OutputExistsError(
                f"{out} holds {path}, which this command reads; --force never replaces it. "
                "Choose another output folder."
            )
    if not out.is_dir() or not (out / "config.json").is_file():
        raise OutputExistsError(
            f"{out} is not a model folder (it has no config.json); --force only replaces model folders. "
            "Choose another output folder, or remove it yourself."
        )


@contextmanager
def staged_folder(out: Path, force: bool = False, keep: Sequence[Path] = ()) -> Iterator[Path]:
    """A hidden work folder that replaces ``out`` when the block completes, and is removed if it fails."""
    out = Path(out).expanduser()
    clean_up_killed_runs(out)
    check_output(out, force, keep)
    work = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        yield work
        if out.exists():
            replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(replaced)
            work.rename(out)
            shutil.rmtree(replaced) if replaced.is_dir() else replaced.unlink()
        else:
            work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def clean_up_killed_runs(out: Path) -> None:
    """Remove the work folders that runs killed before they finished left beside ``out``; put back a model
    folder a killed run had moved aside to replace, if the replacement never arrived."""
    prefix = f".{out.name}."
    for stale in sorted(out.parent.glob(glob.escape(prefix) + "*-*")):
        kind, _, pid = stale.name[len(prefix) :].rpartition("-")
        if kind not in ("incomplete", "replaced") or not pid.isdigit() or _running(int(pid)):
            continue
        if kind == "replaced" and not out.exists():
            stale.rename(out)
        elif stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_weights(
    folder: Path,
    specs: List[TensorSpec],
    produce: Callable[[TensorSpec], mx.array],
    max_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> int:
    """Write the tensors ``produce`` returns, in ``specs`` order, as shards plus index. Returns the bytes."""
    shards = plan_shards(specs, max_bytes)
    total = sum(s.nbytes for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing", disable=not progress) as bar:
        for name, shard in zip(shard_names(len(shards)), shards):
            writer = ShardWriter(folder / name, shard, {"format": "mlx"})
            for spec in shard:
                writer.write(spec.name, produce(spec))
                index["weight_map"][spec.name] = name
                bar.update(spec.nbytes)
                mx.clear_cache()
            writer.close()
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_config(folder: Path, config: dict, quantization: Optional[dict] = None, dtype: Optional[str] = None) -> None:
    """``config.json`` with mlx-lm's ``quantization`` (mirrored in ``quantization_config``) when quantized."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "_name_or_path")}
    if dtype is not None:
        config["torch_dtype"] = dtype
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))


def write_model_card(folder: Path, base_model: str, command: str, precision: str) -> None:
    on_hub = not Path(base_model).exists() and HUB_REPO_ID.match(base_model)
    source = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"
    base = f"base_model: {base_model}\n" if on_hub else ""
    (folder / "README.md").write_text(
        f"""---
library_name: mlx
{base}pipeline_tag: image-text-to-text
tags:
- mlx
- eve
- vision-language
---

# {Path(str(base_model)).name} ({precision}, MLX)

An EVE vision-language model from {source} for
[MLX](https://github.com/ml-explore/mlx), made with mlx-eve by:

```bash
{command}
```

## Use with mlx-eve

```bash
python generate.py --model <this folder or repo> --image photo.jpg -p "What is in the image?"
```
"""
    )


def precision_name(config: dict) -> str:
    quantization = config.get("quantization")
    return f"{quantization['bits']}-bit" if quantization else config.get("torch_dtype", "float")


def save_model(
    model: nn.Module,
    processor,
    config: dict,
    out: Path,
    base_model: str,
    command: str,
    force: bool = False,
    keep: Sequence[Path] = (),
) -> Path:
    """Write ``model`` (as it is in memory) and ``processor``'s files as a loadable model folder (see
    ``staged_folder`` for ``force`` and ``keep``)."""
    weights: Dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in weights.items()]
    floats = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    dtype = str(floats.pop()).split(".")[-1] if len(floats) == 1 else None
    with staged_folder(out, force, keep) as folder:
        write_weights(folder, specs, lambda spec: weights[spec.name])
        processor.save_pretrained(folder)
        quantization = config_block(of_model(model))
        write_config(folder, config, quantization, dtype)
        write_model_card(
            folder, base_model, command, precision_name({**config, "quantization": quantization, "torch_dtype": dtype})
        )
    return Path(out)
