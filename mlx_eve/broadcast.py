"""What rank 0 of a group sends the other ranks each round of the ``Engine``: a ``Plan``, as bytes.

Under tensor parallelism every rank runs every round (``engine.py``). Rank 0 alone takes requests and decides
the round; the others need of each request that joins the batch what makes them prefill and decode it alike:
its token ids and pixels, its prompt-cache key and its ``SamplingParams``. The plan travels as a JSON header and
raw arrays (``pack``), summed over the group with zeros from the other ranks.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .processor import ModelInputs
from .request import Request, SamplingParams


@dataclass
class Plan:
    """One round of the engine, as rank 0 decides it and every rank runs it."""

    admitted: List[Request] = field(default_factory=list)  # requests that join the batch, in this order
    cancelled: List[int] = field(default_factory=list)  # uids of running requests to drop
    close: bool = False  # the engine stops


def broadcast_plan(plan: Optional[Plan], group: mx.distributed.Group) -> Plan:
    """Rank 0's ``plan`` on every rank of ``group`` (``None`` on the others): its length, then its bytes, each
    summed with zeros from the other ranks. An empty plan, most rounds' (each costs a step the latency of these
    sums), is its length alone: 0."""
    data = encode_plan(plan) if plan is not None and plan != Plan() else b""
    size = mx.distributed.all_sum(len(data), group=group, stream=mx.cpu).item()
    if size == 0:
        return Plan()
    buffer = np.frombuffer(data, np.uint8) if plan is not None else np.zeros(size, np.uint8)
    received = np.asarray(mx.distributed.all_sum(mx.array(buffer), group=group, stream=mx.cpu))
    return plan if plan is not None else decode_plan(received.tobytes())


def encode_plan(plan: Plan) -> bytes:
    """A plan as bytes for the other ranks: per admitted request what they need to prefill and decode it alike
    (token ids, pixels, prompt-cache key, sampling settings), not what rank 0 alone uses (images, prompt text)."""
    arrays: List[np.ndarray] = []

    def add(array: mx.array) -> int:
        arrays.append(np.asarray(array))
        return len(arrays) - 1

    admitted = [
        {
            "input_ids": add(r.inputs.input_ids),
            "pixel_values": [add(p) for p in r.inputs.pixel_values],
            "image_tokens": r.inputs.image_tokens,
            "key": r.key,
            "params": asdict(r.params),
        }
        for r in plan.admitted
    ]
    return pack({"admitted": admitted, "cancelled": plan.cancelled, "close": plan.close}, arrays)


def decode_plan(data: bytes) -> Plan:
    """The plan ``encode_plan`` wrote, on a rank without the images: their pixels came with it."""
    header, arrays = unpack(data)
    admitted = []
    for entry in header["admitted"]:
        inputs = ModelInputs.from_pixels(
            mx.array(arrays[entry["input_ids"]]),
            [mx.array(arrays[i]) for i in entry["pixel_values"]],
            entry["image_tokens"],
        )
        params = entry["params"]  # JSON made its tuples lists
        params.update(stop=tuple(params["stop"]), logit_bias=tuple(tuple(pair) for pair in params["logit_bias"]))
        admitted.append(Request(inputs, SamplingParams(**params), entry["key"]))
    return Plan(admitted, header["cancelled"], header["close"])


def pack(header: Dict[str, Any], arrays: Sequence[np.ndarray]) -> bytes:
    """A JSON ``header`` and numpy ``arrays`` as bytes: the header's length (8 bytes), the JSON (with the arrays'
    dtypes and shapes), the arrays' raw bytes (in C order). No pickle: unpickling can run any code."""
    arrays = [np.asarray(a) for a in arrays]
    if any(a.dtype.hasobject for a in arrays):
        raise TypeError("Only arrays of numbers can be packed.")
    meta = json.dumps({"header": header, "arrays": [[a.dtype.str, a.shape] for a in arrays]}).encode()
    return b"".join([len(meta).to_bytes(8, "little"), meta, *(a.tobytes() for a in arrays)])


def unpack(data: bytes) -> Tuple[Dict[str, Any], List[np.ndarray]]:
    """``pack``'s header and arrays (read-only views of ``data``)."""
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + size])
    arrays, offset = [], 8 + size
    for dtype, shape in meta["arrays"]:
        dtype, count = np.dtype(dtype), math.prod(shape)
        arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape))
        offset += dtype.itemsize * count
    return meta["header"], arrays
