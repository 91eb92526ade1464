"""Loading a tensor-parallel model: each rank reads only its part of every weight the sharding splits.

``model.shard(group)`` (``models/base.py``) splits the decoder linears as mlx's ``shard_linear`` does: one axis
of each split weight is cut into ``group.size()`` equal parts and rank ``r`` keeps the ``r``-th. Run on the
model before its weights are loaded, it tells from the shapes alone which part of every stored tensor a rank
needs, and that part is read straight from the ``.safetensors`` file. Slicing the lazily loaded tensors instead
(as mlx-lm's ``sharded_load`` does) reads each one whole, and evaluating the model reads many of them at once:
for ``benchmarks/distributed.py``'s model, a peak of 1.72 GB per rank of two instead of 1.10 GB.
"""

import json
from pathlib import Path
from typing import Dict, List, NamedTuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .models.base import EVEModel

# safetensors dtype → (numpy type to read the bytes as, MLX dtype they hold). numpy has no bfloat16.
_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
}


def take_parts(
    model: EVEModel, weights: Dict[str, mx.array], files: List[Path], group: mx.distributed.Group
) -> Dict[str, mx.array]:
    """``weights`` (as loaded: lazy and whole) with every weight that ``model``, already sharded over ``group``,
    holds a part of cut to this rank's part. A part is read from the checkpoint file when the weight is stored
    there as it is (``.safetensors``, not renamed or converted); otherwise it is sliced from the loaded weight,
    which is then read whole (``.bin`` checkpoints)."""
    held = dict(tree_flatten(model.parameters()))
    stored = _safetensors_entries(files)
    parts = {}
    for key, weight in weights.items():
        shape = held[key].shape
        if weight.shape == shape:
            parts[key] = weight
            continue
        axis = next(i for i, (whole, part) in enumerate(zip(weight.shape, shape)) if whole != part)
        start = group.rank() * shape[axis]
        index = (slice(None),) * axis + (slice(start, start + shape[axis]),)
        tensor = stored.get(key)
        if tensor is not None and tensor.shape == weight.shape and _DTYPES[tensor.dtype][1] == weight.dtype:
            parts[key] = tensor.read(index)
        else:
            parts[key] = mx.contiguous(weight[index])
    return parts


class _Stored(NamedTuple):
    """Where a tensor lies in a ``.safetensors`` file."""

    file: Path
    offset: int
    shape: tuple
    dtype: str

    def read(self, index: tuple) -> mx.array:
        """``tensor[index]``, reading from the file only the pages that part lies on."""
        np_dtype, dtype = _DTYPES[self.dtype]
        tensor = np.memmap(self.file, np_dtype, mode="r", offset=self.offset, shape=self.shape)
        # From a strided numpy view MLX would copy the whole span the view covers.
        return mx.array(np.ascontiguousarray(tensor[index])).view(dtype)


def _safetensors_entries(files: List[Path]) -> Dict[str, _Stored]:
    """Every tensor of the ``.safetensors`` files of a dtype we can read, from the files' headers."""
    entries = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"] in _DTYPES:
                entries[key] = _Stored(file, 8 + size + info["data_offsets"][0], tuple(info["shape"]), info["dtype"])
    return entries
