"""``load``: a local folder or Hugging Face repo (original PyTorch checkpoint or MLX conversion) → model, processor."""

import json
import pickle
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import huggingface_hub
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import quantization
from .adapters import load_adapters
from .cpu import compute_dtype, hint_openblas
from .errors import CheckpointError, MissingDependencyError, ModelNotFoundError
from .families import family_of
from .fields import field_problems
from .image_processing import ImageProcessor
from .models.base import EVEModel, ShardingError
from .processor import Processor
from .sharding import take_parts

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NON_WEIGHT_FILES = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.md"]
# (index file, shard pattern) in order of preference.
WEIGHT_LAYOUTS = [
    ("model.safetensors.index.json", "model*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
]


def load(
    path_or_repo: str,
    adapter_path: Optional[str] = None,
    *,
    max_size: Optional[int] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
    dtype: Optional[mx.Dtype] = None,
    group: Optional[mx.distributed.Group] = None,
) -> Tuple[EVEModel, Processor]:
    """Load an EVEv1 or EVEv2 model and its processor.

    Args:
        path_or_repo: a local model folder or a Hugging Face repo id (downloaded on first use).
        adapter_path: a folder with LoRA adapters (``adapter_config.json`` + ``adapters.safetensors``).
        max_size: EVEv2 image resolution (default from the checkpoint, 1600).
        lazy: leave the weights unevaluated until first use.
        dtype: cast the floating-point weights (quantization scales included) to this type. By default they
            keep the checkpoint's, except on the CPU, where 16-bit weights become float32 (see ``cpu.compute_dtype``).
        group: a distributed group (``mx.distributed.init()``) of more than one process to split the decoder over
            (tensor parallelism, see ``EVEModel.shard``). Every rank calls ``load``; each reads only its part of
            the split weights from ``.safetensors`` files (``.bin`` files are read whole, then split).
    """
    hint_openblas()
    model_path = get_model_path(path_or_repo, revision)
    config, image_processor, model = model_skeleton(model_path, max_size)
    weights = model.sanitize(read_weights(model_path))
    quantization.apply(model, quantization.of_checkpoint(model, config, weights))
    check_weights(model, weights, model_path)
    sharded = group is not None and group.size() > 1
    if sharded:
        if adapter_path is not None:
            raise ShardingError("Adapters cannot be split over processes: fuse them first (mlx_eve.fuse).")
        model.shard(group)
        weights = take_parts(model, weights, weight_files(model_path), group)
    model.load_weights(list(weights.items()))
    dtype = dtype or compute_dtype(model)
    if dtype is not None:
        model.set_dtype(dtype)
    if adapter_path is not None:
        model = load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
        warn_if_not_finite(model, model_path)
    if sharded:  # as mlx-lm's sharded_load: wait for the slowest rank here, not in the first collective
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu, group=group))
    model.eval()
    processor = Processor.from_pretrained(model_path, config, image_processor, model.family.template)
    if len(processor.tokenizer) < model.args.vocab_size:
        model.vocab_limit = len(processor.tokenizer)
    return model, processor


def get_model_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path_or_repo} is a file; pass the folder that holds config.json.")
    if not HUB_REPO_ID.match(str(path_or_repo)):
        raise ModelNotFoundError(f"Model folder not found: {path_or_repo}")
    return _download(str(path_or_repo), revision)


def _download(repo_id: str, revision: Optional[str]) -> Path:
    try:
        # model_info fails at once when offline (listing the repo tree retries for ~25 s).
        files = [f.rfilename for f in huggingface_hub.model_info(repo_id, revision=revision).siblings or []]
    except Exception as e:  # offline or unreachable: a complete cached snapshot still works
        try:
            return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            raise ModelNotFoundError(
                f"{repo_id!r} is not a local folder, and the Hugging Face Hub could not provide it "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). "
                "Check the repo id and your network connection, or pass a local model folder."
            ) from e
    safetensors = any(f.endswith(".safetensors") for f in files)
    patterns = NON_WEIGHT_FILES + (["*.safetensors"] if safetensors else ["*.bin"])
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFoundError(f"Downloading {repo_id!r} from the Hugging Face Hub failed: {e}") from e


def read_config(model_path: Path) -> dict:
    file = model_path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{model_path} has no config.json: it is not a model folder.")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} should hold a JSON object, not a {type(config).__name__}.")
    if "model_type" not in config:
        raise CheckpointError(f"{file} has no model_type: it does not describe an EVE model.")
    family_of(config["model_type"])  # unknown types fail here, with the supported ones listed
    return config


def model_skeleton(model_path: Path, max_size: Optional[int] = None) -> Tuple[dict, ImageProcessor, EVEModel]:
    """The config, the image processor and the model (with initial weights, not evaluated) of a model folder."""
    config = read_config(model_path)
    image_processor = family_of(config["model_type"]).image_processor.from_pretrained(model_path, config, max_size)
    return config, image_processor, build_model(config, image_processor.model_args(), model_path / "config.json")


def build_model(config: dict, vision_args: Dict[str, int], source: Path = Path("config.json")) -> EVEModel:
    """The family's model for ``config`` (plus the image processor's strides); ``CheckpointError`` naming
    every field that is missing, of the wrong type or out of range."""
    family = family_of(config["model_type"])
    model_class, args_class = family.model_classes()
    values = {**config, **vision_args}
    problems = field_problems(values, args_class)
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if not problems and isinstance(kv_heads, int) and heads % kv_heads:
        problems.append(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    try:
        if not problems:
            return model_class(args_class.from_dict(values))
    except (TypeError, ValueError, KeyError) as e:
        problems.append(str(e))
    raise CheckpointError(f"{source} does not describe an {family.name} model: {'; '.join(problems)}.")


def weight_files(model_path: Path) -> List[Path]:
    """The shards of the checkpoint: from its index when there is one, else by file name."""
    for index_name, pattern in WEIGHT_LAYOUTS:
        index = model_path / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(
                    f"{index} is not a valid weight index (a JSON object with a weight_map): {e}"
                ) from e
            missing = [s for s in shards if not (model_path / s).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}.")
            return [model_path / s for s in shards]
        files = sorted(model_path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"No weights in {model_path}: expected model*.safetensors or pytorch_model*.bin files.")


def read_weights(model_path: Path) -> Dict[str, mx.array]:
    reader = WeightReader(model_path)
    return {key: reader.take(key) for key in reader.keys()}


class WeightReader:
    """Every tensor of a checkpoint, by name, reading no data until a tensor is taken.

    ``.safetensors`` shards are opened lazily by MLX; ``.bin`` shards are memory-mapped by
    ``torch.load(weights_only=True, mmap=True)`` and converted one tensor at a time. ``take`` hands a
    tensor over and forgets it, so once the caller drops it its memory is freed.
    """

    def __init__(self, model_path: Path):
        self.files = weight_files(model_path)
        self._tensors = {}
        for file in self.files:
            self._tensors.update(_open_safetensors(file) if file.suffix == ".safetensors" else _open_torch(file))

    def keys(self) -> List[str]:
        return list(self._tensors)

    def spec(self, key: str) -> Tuple[tuple, mx.Dtype]:
        """Shape and MLX dtype of a tensor, from the file headers only."""
        tensor = self._tensors[key]
        if isinstance(tensor, mx.array):
            return tuple(tensor.shape), tensor.dtype
        return tuple(tensor.shape), _TORCH_TO_MLX_DTYPES[str(tensor.dtype)]

    def take(self, key: str) -> mx.array:
        tensor = self._tensors.pop(key)
        return tensor if isinstance(tensor, mx.array) else _torch_to_mlx(tensor)


def _open_safetensors(file: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except Exception as e:
        raise CheckpointError(f"Could not read {file}: {e}") from e


def _open_torch(file: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            f"{file.name} is a PyTorch checkpoint and reading it needs torch: pip install 'mlx-eve[torch]'."
        ) from None
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} holds more than plain tensors; refusing to unpickle it. ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:
        raise CheckpointError(f"Could not read {file}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} is not a flat dictionary of tensors.")
    unsupported = sorted({str(v.dtype) for v in state.values()} - _TORCH_TO_MLX_DTYPES.keys())
    if unsupported:
        raise CheckpointError(f"{file} holds tensors of unsupported types: {', '.join(unsupported)}.")
    return state


_TORCH_TO_MLX_DTYPES = {
    "torch.float32": mx.float32,
    "torch.float16": mx.float16,
    "torch.bfloat16": mx.bfloat16,
    "torch.int64": mx.int64,
    "torch.int32": mx.int32,
    "torch.uint8": mx.uint8,
    "torch.bool": mx.bool_,
}


def _torch_to_mlx(tensor) -> mx.array:
    import torch

    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw bits
        return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())


def check_weights(model: nn.Module, weights: Dict[str, mx.array], source: Path, shown: int = 8) -> None:
    """Every weight present, nothing unknown, every shape and type right; otherwise an error naming the keys.
    A floating-point weight may be stored in any floating-point type; any other must be stored as the model
    holds it (packed quantized weights as uint32)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    common = sorted(expected.keys() & weights.keys())
    wrong = [
        f"{k} (checkpoint {tuple(weights[k].shape)}, model {tuple(expected[k].shape)})"
        for k in common
        if weights[k].shape != expected[k].shape
    ]
    mistyped = [
        f"{k} (checkpoint {_dtype_name(weights[k])}, model {_dtype_name(expected[k])})"
        for k in common
        if not _same_kind(weights[k].dtype, expected[k].dtype)
    ]
    problems = [
        (f"{len(keys)} {label}", keys)
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrongly shaped", wrong),
            ("of the wrong type", mistyped),
        )
        if keys
    ]
    if problems:
        lines = [f"The weights in {source} do not match the {model.model_type} model:"]
        for label, keys in problems:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            lines.append(f"  {label}: {', '.join(keys[:shown])}{more}")
        raise CheckpointError("\n".join(lines))


def _same_kind(stored: mx.Dtype, wanted: mx.Dtype) -> bool:
    floating = mx.issubdtype(wanted, mx.floating)
    return mx.issubdtype(stored, mx.floating) if floating else stored == wanted


def _dtype_name(array: mx.array) -> str:
    return str(array.dtype).split(".")[-1]


def warn_if_not_finite(model: nn.Module, source: Path, shown: int = 8) -> None:
    """A warning naming the weights that hold NaN or Inf: such a model loads, but its answers are garbage."""
    bad = [k for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating) and not _finite(v)]
    if bad:
        more = f", ... ({len(bad) - shown} more)" if len(bad) > shown else ""
        print(
            f"[WARNING] {len(bad)} weight(s) in {source} hold NaN or Inf values, so the model's output will be "
            f"meaningless: {', '.join(bad[:shown])}{more}",
            file=sys.stderr,
        )


def _finite(array: mx.array, chunk: int = 1 << 24) -> bool:
    """Checked in chunks, so no temporary as large as the largest weight is ever made."""
    flat = array.reshape(-1)
    return all(mx.isfinite(flat[i : i + chunk]).all().item() for i in range(0, flat.size, chunk))
