"""Converting an original EVE checkpoint to MLX, optionally quantized, one tensor at a time; uploading it.

Memory stays bounded by the largest tensor: the output is planned from the file headers (names, shapes,
dtypes, nothing read), then each tensor is read, cleaned up (``sanitize``), cast, quantized and written
straight into its output shard. Everything goes to a hidden ``.<name>.incomplete-<pid>`` folder that is
renamed into place only once complete.
"""

import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import huggingface_hub
import mlx.core as mx
from mlx.utils import tree_flatten

from . import quantization
from .arguments import DTYPES
from .errors import EVEError
from .loading import HUB_REPO_ID, WeightReader, check_weights, get_model_path, model_skeleton
from .models.base import EVEModel
from .processor import copy_processor_files
from .saving import (
    check_output,
    precision_name,
    staged_folder,
    write_config,
    write_model_card,
    write_weights,
)
from .shard_writer import TensorSpec


class ConvertError(EVEError, ValueError):
    pass


class Converter:
    """The per-module transformation, applied first to lazy zeros (the plan) and then to real tensors."""

    def __init__(
        self, model: EVEModel, dtype: Optional[mx.Dtype], quantize: Dict[str, dict], dequantize: Dict[str, dict]
    ):
        self.model, self.dtype, self.quantize, self.dequantize = model, dtype, quantize, dequantize

    def __call__(self, tensors: Dict[str, mx.array]) -> Dict[str, mx.array]:
        weights = self.model.sanitize(tensors)
        for path, params in self.dequantize.items():
            if f"{path}.scales" in weights:
                weights[f"{path}.weight"] = mx.dequantize(
                    weights[f"{path}.weight"],
                    weights.pop(f"{path}.scales"),
                    weights.pop(f"{path}.biases", None),
                    **params,
                )
        if self.dtype is not None:
            weights = {
                k: v.astype(self.dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
            }
        for key in list(weights):
            path = key[: -len(".weight")]
            if key.endswith(".weight") and path in self.quantize:
                params = self.quantize[path]
                weights[key], weights[f"{path}.scales"], weights[f"{path}.biases"] = mx.quantize(
                    weights[key], group_size=params["group_size"], bits=params["bits"]
                )
        return weights


def _modules(keys: List[str]) -> Dict[str, List[str]]:
    """Tensor names grouped by the module that owns them (a quantized layer's weight, scales, biases)."""
    groups: Dict[str, List[str]] = {}
    for key in keys:
        groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
    return groups


def convert(
    hf_path: str,
    mlx_path: Union[str, Path] = "mlx_model",
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    quant_predicate: Optional[str] = None,
    dtype: Optional[str] = None,
    dequantize: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    revision: Optional[str] = None,
    max_shard_gb: float = 5.0,
    command: Optional[str] = None,
) -> Path:
    """Convert ``hf_path`` (a local folder or Hugging Face repo) into an MLX checkpoint at ``mlx_path``."""
    start = time.perf_counter()
    if quantize and dequantize:
        raise ConvertError("Choose either --quantize or --dequantize, not both.")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"Unsupported --dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    out = Path(mlx_path).expanduser()
    check_output(out, force, keep=[Path(hf_path)])
    if upload_repo is not None:
        check_upload(upload_repo)

    source = get_model_path(hf_path, revision)
    config, image_processor, model = model_skeleton(source)  # the model's own weights are never evaluated
    reader = WeightReader(source)
    source_quantization = _source_quantization(model, config, reader, hf_path, dequantize)

    target_dtype = dtype or config.get("torch_dtype")
    plan = {}
    if quantize:
        keep_float = model.family.patch_embedding_paths
        plan = quantization.plan(model, q_bits, q_group_size, quant_predicate, keep_float)
    quantization_config = quantization.config_block(plan)
    converter = Converter(
        model, getattr(mx, target_dtype) if target_dtype in DTYPES else None, plan, source_quantization
    )

    modules = _modules(reader.keys())
    outputs = _planned_outputs(converter, reader, modules)
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))  # before quantizing the skeleton
    quantization.apply(model, plan)
    check_weights(model, {s.name: mx.zeros(s.shape, s.dtype) for specs in outputs.values() for s in specs}, source)
    specs = [s for path in modules for s in outputs[path]]
    total_bytes = sum(s.nbytes for s in specs)
    _check_disk_space(out, total_bytes)

    try:
        with staged_folder(out, force, keep=[source]) as folder:
            write_weights(folder, specs, _producer(converter, reader, modules), int(max_shard_gb * 2**30))
            copy_processor_files(source, folder, image_processor)
            write_config(folder, config, quantization_config, target_dtype if target_dtype in DTYPES else None)
            command = command or f"python convert.py --hf-path {hf_path}"
            precision = quant_predicate or precision_name(
                {**config, "quantization": quantization_config, "torch_dtype": target_dtype}
            )
            write_model_card(folder, hf_path, command, precision)
    except OSError as e:
        raise ConvertError(f"Writing {out} failed: {e}") from e

    bits_per_weight = 8 * total_bytes / parameters
    print(
        f"[INFO] Wrote {out}: {bits_per_weight:.3f} bits per weight, {total_bytes / 1e9:.3f} GB, "
        f"{time.perf_counter() - start:.1f} s."
    )
    if upload_repo is not None:
        upload_to_hub(out, upload_repo)
    return out


def _source_quantization(model: EVEModel, config: dict, reader: WeightReader, hf_path: str, dequantize: bool) -> dict:
    """How the checkpoint is quantized (read from its headers), refused unless it is to be dequantized."""
    placeholders = {k: mx.zeros(*reader.spec(k)) for k in reader.keys()}  # lazy: nothing is allocated
    source_quantization = quantization.of_checkpoint(model, config, model.sanitize(placeholders))
    if source_quantization and not dequantize:
        raise ConvertError(
            f"{hf_path} is already quantized: convert the original checkpoint, or pass -d to dequantize it."
        )
    if dequantize and not source_quantization:
        raise ConvertError(f"{hf_path} is not quantized: there is nothing to dequantize.")
    return source_quantization


def _planned_outputs(
    converter: Converter, reader: WeightReader, modules: Dict[str, List[str]]
) -> Dict[str, List[TensorSpec]]:
    """Each module's output tensors: the conversion run on lazy zeros of the right shapes (nothing is read or
    computed)."""
    outputs = {}
    for path, keys in modules.items():
        zeros = {k: mx.zeros(*reader.spec(k)) for k in keys}
        outputs[path] = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in converter(zeros).items()]
    return outputs


def _producer(
    converter: Converter, reader: WeightReader, modules: Dict[str, List[str]]
) -> Callable[[TensorSpec], mx.array]:
    """The output tensors, asked for in module order: each module is read and converted when first needed."""
    pending: Dict[str, mx.array] = {}
    remaining = iter(modules.values())

    def produce(spec: TensorSpec) -> mx.array:
        while spec.name not in pending:  # convert the next module's tensors
            keys = next(remaining)
            pending.update(converter({k: reader.take(k) for k in keys}))
            mx.eval(list(pending.values()))
        return pending.pop(spec.name)

    return produce


def _check_disk_space(out: Path, needed: int) -> None:
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if needed * 1.02 + 2**20 > free:
        raise ConvertError(
            f"Not enough disk space for {out}: it needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free."
        )


def check_upload(repo_id: str) -> None:
    """Fail before any work if ``repo_id`` cannot be uploaded to: a malformed id, no network, no login."""
    if not HUB_REPO_ID.match(repo_id):
        raise ConvertError(f"--upload-repo {repo_id!r} is not a Hugging Face repo id (user/name).")
    try:
        huggingface_hub.HfApi().whoami()
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"Cannot upload to {repo_id}: the Hugging Face Hub did not accept this machine's login ({detail}). "
            "Check the network and run `hf auth login`, or leave out --upload-repo."
        ) from e


def upload_to_hub(path: Path, repo_id: str) -> None:
    card = path / "README.md"
    card.write_text(card.read_text().replace("<this folder or repo>", repo_id))
    api = huggingface_hub.HfApi()
    api.create_repo(repo_id=repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model")
    print(f"[INFO] Uploaded to https://huggingface.co/{repo_id}")
