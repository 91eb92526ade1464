"""What the learned quantizers (``mlx_eve.awq``, ``gptq``, ``dwq``, ``dynamic_quant``) share: calibration samples
read from EVE's own data (images with conversations), and the model as mlx-lm's quantizers call one.

mlx-lm calibrates on text. An EVE model must see images too: EVEv2's visual branch (``moe_*``) only ever sees
image tokens. Each sample keeps the float patch embedding's output for its images, so every pass through the
decoder (float or being quantized) gets the very activations it gets in use, and the patch embedding, which
stays in floating point, never needs to run again.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.losses import kl_div_loss

from ..data import Sample, load_splits
from ..image import load_image
from ..loading import get_model_path, load, read_config
from ..models.base import IMAGE_TOKEN_ID, EVEModel, embed_with_images
from ..processor import Processor
from ..records import DataError
from ..saving import save_model


@dataclass
class CalibrationSample:
    where: str  # "file:line" of its record
    input_ids: mx.array  # (L,) int32, image placeholders expanded
    image_features: List[mx.array]  # per image, the float patch embedding's output (tokens, hidden_size)

    @property
    def text_positions(self) -> mx.array:
        """(L - 1,) bool: the positions whose next token is text, the only predictions generation uses."""
        return self.input_ids[1:] != IMAGE_TOKEN_ID


def draw(
    splits: Dict[str, List[Sample]], num_samples: int, seed: int, num_valid: int = 0, split: str = "train"
) -> Tuple[List[Sample], List[Sample]]:
    """``num_samples`` records (-1: all) of ``split`` drawn with ``seed``, and ``num_valid`` held-out ones: the
    first of the valid split, else records of ``split`` left out of training (as mlx-lm's DWQ holds them out)."""
    if split not in splits:
        raise DataError(f"The data has no {split} split.")
    records = splits[split]
    order = np.random.default_rng(seed).permutation(len(records)).tolist()
    chosen = order if num_samples == -1 else order[:num_samples]
    held_out = (
        splits["valid"][:num_valid] if "valid" in splits else [records[i] for i in order[len(chosen) :]][:num_valid]
    )
    if num_valid and not held_out:
        raise DataError(f"All {len(records)} records are drawn for training: none is left to validate on.")
    return [records[i] for i in chosen], held_out


def load_calibration(
    data_path: Path,
    model: EVEModel,
    processor: Processor,
    num_samples: int = 128,
    max_seq_length: int = 4096,
    seed: int = 123,
) -> List[CalibrationSample]:
    """``num_samples`` records (-1: all) drawn with ``seed`` from the training split of a fine-tuning or evaluation
    data set (a folder of ``train``/``valid``/``test.jsonl`` or one ``.json``/``.jsonl`` file), their images run
    through ``model``'s patch embedding. Every problem in the data is reported with its file and line first."""
    records, _ = draw(load_splits(Path(data_path), processor, max_seq_length), num_samples, seed)
    samples = []
    for record in records:
        features = [model.encode_image(mx.array(processor.image_processor(load_image(p)))) for p in record.images]
        mx.eval(features)
        samples.append(CalibrationSample(record.where, mx.array(record.input_ids), features))
    if getattr(model.args, "add_moe", False) and not any(s.image_features for s in samples):
        raise DataError(f"The calibration samples from {data_path} hold no image: EVEv2's visual branch needs some.")
    return samples


class CalibrationModel(nn.Module):
    """An EVE model's decoder and head, called as mlx-lm's quantizers call a model: ``model(samples)``, a list of
    calibration samples, gives the logits ``(1, total length, vocabulary)`` of the samples one after another
    (no padding). It holds the EVE model's own modules under the same paths, so what mlx-lm quantizes in it is
    quantized in the EVE model, whose patch embedding ``set_aside`` keeps out of reach."""

    def __init__(self, model: EVEModel):
        super().__init__()
        self.model = model.model
        if "lm_head" in model:
            self.lm_head = model.lm_head
        self.args, self.vocab_limit = model.args, model.vocab_limit

    logits = EVEModel.logits

    def embed(self, sample: CalibrationSample) -> mx.array:
        return embed_with_images(self.model.embed_tokens, sample.input_ids, sample.image_features)

    def __call__(self, samples: List[CalibrationSample]) -> mx.array:
        return mx.concatenate(
            [self.logits(self.model(s.input_ids[None], None, self.embed(s)[None])) for s in samples], axis=1
        )


@contextlib.contextmanager
def set_aside(model: EVEModel) -> Iterator[CalibrationModel]:
    """The model's ``CalibrationModel``, with the patch embedding out of the module tree until the block ends
    (it stays in floating point, and its output is in the samples already). What the quantizer put in the
    calibration model's place (the LM head) is put in the EVE model's."""
    aside = {name: model.model.pop(name) for name in model.family.patch_embedding if name in model.model}
    calibrated = CalibrationModel(model)
    try:
        yield calibrated
    finally:
        for name, module in calibrated.children().items():
            model[name] = module
        for name, module in aside.items():
            model.model[name] = module


def kl_to_teacher(student_logits: mx.array, teacher_logits: mx.array, temperature: float = 1.0) -> mx.array:
    """Per position, KL(teacher ‖ student) of the softened distributions, as mlx-lm's ``kl_div_loss``."""
    scale = 1 / temperature
    return kl_div_loss(scale * student_logits.astype(mx.float32), scale * teacher_logits.astype(mx.float32))


def distillation_loss(student: nn.Module, teacher: nn.Module, samples: List[CalibrationSample]) -> float:
    """Mean KL from ``teacher`` (the float model) to ``student`` over the samples' text predictions: how far
    quantization moved the model, 0 for the float model itself. Both are ``CalibrationModel``s."""
    total, count = 0.0, 0
    for sample in samples:
        kl = kl_to_teacher(student([sample])[0, :-1], mx.stop_gradient(teacher([sample])[0, :-1]))
        mask = sample.text_positions
        total += (kl * mask).sum().item()
        count += int(mask.sum().item())
    return total / max(count, 1)


def load_for_quantization(model_path: str, max_size: Optional[int] = None) -> Tuple[EVEModel, Processor, dict, Path]:
    """A floating-point model to quantize, its processor, its ``config.json`` and its folder."""
    path = get_model_path(model_path)
    config = read_config(path)
    if config.get("quantization"):
        raise DataError(f"{model_path} is quantized already: start from the floating-point model.")
    model, processor = load(str(path), max_size=max_size)
    model.freeze()
    return model, processor, config, path


def save_quantized(
    model: EVEModel, processor: Processor, config: dict, out: Path, base_model: str, command: str, force: bool
) -> Path:
    """The quantized model as a normal model folder, floating-point weights back in the checkpoint's type
    (on a CPU they were computed in float32), written atomically."""
    dtype = config.get("torch_dtype")
    if dtype in ("float16", "bfloat16", "float32"):
        model.set_dtype(getattr(mx, dtype))
    return save_model(model, processor, config, Path(out), base_model, command, force)
