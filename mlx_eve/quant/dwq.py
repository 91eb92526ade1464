"""DWQ calibrated on images: a quantized EVE model's scales and biases (and norms) learnt by distillation from the
floating-point model on the same images and conversations, as ``mlx_lm.dwq`` does on text.

The student is rounded to nearest, or any quantized model (``--quantized-model``, an AWQ or GPTQ output, say).
Training is mlx-eve's fine-tuning loop: batches of images with conversations, checkpoints that resume exactly
(``--resume``), a stop on Ctrl-C at the next checkpoint. ``python -m mlx_eve.dwq --model M --data-path data/``.
"""

from typing import Callable, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..data import Sample
from ..models.base import IMAGE_TOKEN_ID, EVEModel
from ..trainer import Batch, TrainingArgs, batch_embeddings, make_batch, train
from .calibration import kl_to_teacher

# mlx-lm's DWQ softens both distributions by this temperature.
TEMPERATURE = 2.0


def distillation(teacher: EVEModel, temperature: float = TEMPERATURE) -> Callable[[EVEModel, Batch], Tuple]:
    """The training loss: KL from ``teacher`` to the model over every prediction of a text token (image rows
    are never predicted in use), summed, with the count of those predictions."""

    def loss(student: EVEModel, batch: Batch) -> Tuple[mx.array, mx.array]:
        inputs = batch.input_ids[:, :-1]
        logits = student(inputs, input_embeddings=batch_embeddings(student, batch)[:, :-1])
        targets = mx.stop_gradient(teacher(inputs, input_embeddings=batch_embeddings(teacher, batch)[:, :-1]))
        lengths = mx.array(batch.lengths)[:, None]
        mask = (mx.arange(inputs.shape[1])[None] < lengths - 1) & (batch.input_ids[:, 1:] != IMAGE_TOKEN_ID)
        return (kl_to_teacher(logits, targets, temperature) * mask).sum(), mask.sum()

    return loss


def mean_loss(loss: Callable, model: EVEModel, samples: List[Sample], image_processor, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        summed, n = loss(model, make_batch(samples[start : start + batch_size], image_processor))
        total, count = total + summed.item(), count + n.item()
    return total / max(count, 1)


def make_trainable(student: EVEModel) -> None:
    """Unfreeze what DWQ learns: the scales and biases of every layer quantized below 8 bits (mlx-lm's rule)
    and the norms, in float32 so that small steps are not rounded away. The patch embedding stays as it is."""
    student.freeze()

    def unfreeze(_, module: nn.Module) -> None:
        if getattr(module, "mode", None) == "affine" and module.bits < 8:
            module.unfreeze(keys=["scales", "biases"], recurse=False)
        elif isinstance(module, nn.RMSNorm):
            module.unfreeze()

    student.apply_to_modules(unfreeze)
    student.update(tree_map(lambda x: x.astype(mx.float32), student.trainable_parameters()))


def dwq_quantize(
    student: EVEModel,
    teacher: EVEModel,
    train_set: List[Sample],
    valid_set: List[Sample],
    image_processor,
    args: TrainingArgs,
    checkpoint_path,
    resume: bool = False,
    report: Callable[[str], None] = print,
) -> Tuple[float, float]:
    """Distil ``teacher`` into the quantized ``student`` in place; returns the validation loss (mean KL per text
    prediction, at ``TEMPERATURE``) before and after."""
    make_trainable(student)
    loss = distillation(teacher)
    before = mean_loss(loss, student, valid_set, image_processor, args.batch_size)
    report(f"Distillation loss on {len(valid_set)} validation samples: {before:.4f}")
    last = train(student, image_processor, train_set, None, args, checkpoint_path, resume, report, loss)
    if last < args.iters:  # stopped by Ctrl-C at a checkpoint: no model, so that nothing looks finished
        raise KeyboardInterrupt
    student.eval()
    after = mean_loss(loss, student, valid_set, image_processor, args.batch_size)
    report(f"Distillation loss on {len(valid_set)} validation samples: {after:.4f} (from {before:.4f})")
    if after > before:
        report("[WARNING] DWQ raised the validation loss: try a smaller --learning-rate.")
    return before, after
