"""Sharded safetensors written one tensor at a time, so no more than one tensor is ever held in memory.

The safetensors header (names, dtypes, shapes, offsets) is written first from a plan; tensors then follow
in plan order. The result is an ordinary ``model-0000i-of-0000n.safetensors`` set plus its index.
"""

import json
import struct
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

DTYPE_NAMES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.uint8: "U8",
    mx.bool_: "BOOL",
}


class TensorSpec(NamedTuple):
    name: str
    shape: tuple
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.size


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> List[List[TensorSpec]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards, size = [], 0
    for spec in specs:
        if not shards or size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """One safetensors file: ``write`` each planned tensor in order, then ``close``."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: Dict[str, str]):
        header, offset = {"__metadata__": metadata}, 0
        for spec in specs:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.specs, self.position = list(specs), 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, array: mx.array) -> None:
        spec = self.specs[self.position]
        if (name, tuple(array.shape), array.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(f"Expected {spec}, got {name} {tuple(array.shape)} {array.dtype}.")
        raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array  # numpy has no bfloat16
        self.file.write(np.ascontiguousarray(np.asarray(raw)))
        self.position += 1

    def close(self) -> None:
        self.file.close()
        if self.position != len(self.specs):
            raise ValueError(f"{len(self.specs) - self.position} planned tensors were not written.")
