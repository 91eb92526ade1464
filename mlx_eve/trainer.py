"""The fine-tuning loop: image+text batches, answer-only loss, checkpoints that resume exactly, data parallel.

Batches and random numbers (dropout) are deterministic functions of (seed, step), and a checkpoint holds
the trainable weights and the optimizer state, so a run resumed from step N continues exactly as the
uninterrupted run would have. With ``mx.distributed`` (launched by ``mlx.launch``) every process takes its share of each
global batch and the gradients are averaged, giving the same updates as one process with the whole batch.
"""

import dataclasses
import json
import math
import shutil
import signal
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.utils import build_schedule
from mlx_lm.utils import get_total_parameters

from .data import Sample
from .errors import EVEError
from .families import Family
from .image import load_image
from .models.base import EVEModel

CHECKPOINT = "checkpoint"
ADAPTERS = "adapters.safetensors"


class TrainingError(EVEError, RuntimeError):
    pass


@dataclass
class TrainingArgs:
    """The training loop's options: ``mlx_eve.lora``'s, which define their defaults and ranges
    (``mlx_eve.lora.training_args``)."""

    batch_size: int
    iters: int
    learning_rate: float
    patch_embedding_lr_scale: float  # its learning rate relative to the rest
    lr_schedule: str  # constant | cosine | linear (decay to 10% of the peak)
    warmup: int
    optimizer: str  # adam | adamw
    weight_decay: float
    max_grad_norm: Optional[float]
    grad_accumulation_steps: int
    val_batches: int
    steps_per_report: int
    steps_per_eval: int
    save_every: int
    seed: int


@dataclass
class Batch:
    input_ids: mx.array  # (B, L) int32, right-padded with 0
    targets: mx.array  # (B, L - 1) bool: which next tokens are supervised
    pixel_values: List[List[mx.array]]  # per sample, its images
    lengths: List[int]


def make_batch(samples: List[Sample], image_processor) -> Batch:
    length = max(len(s.input_ids) for s in samples)
    ids = np.zeros((len(samples), length), np.int32)
    targets = np.zeros((len(samples), length), bool)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.input_ids)] = sample.input_ids
        targets[row, : len(sample.targets)] = sample.targets
    pixels = [[mx.array(image_processor(load_image(p))) for p in s.images] for s in samples]
    return Batch(mx.array(ids), mx.array(targets[:, 1:]), pixels, [len(s.input_ids) for s in samples])


def batch_embeddings(model: EVEModel, batch: Batch) -> mx.array:
    """(B, L, D): each sample's text and image embeddings, zero-padded on the right."""
    rows = []
    for ids, pixels, n in zip(batch.input_ids, batch.pixel_values, batch.lengths):
        embeddings = model.embed_inputs(ids[:n], pixels)
        pad = batch.input_ids.shape[1] - n
        rows.append(mx.pad(embeddings, [(0, pad), (0, 0)]) if pad else embeddings)
    return mx.stack(rows)


Loss = Callable[[EVEModel, Batch], Tuple[mx.array, mx.array]]


def loss_sum(model: EVEModel, batch: Batch) -> Tuple[mx.array, mx.array]:
    """Summed cross-entropy over the supervised tokens, and their count. Padding is never supervised and,
    being on the right of a causal model, never seen by a real token."""
    embeddings = batch_embeddings(model, batch)
    return answer_loss(model(batch.input_ids[:, :-1], input_embeddings=embeddings[:, :-1]), batch)


def answer_loss(logits: mx.array, batch: Batch) -> Tuple[mx.array, mx.array]:
    """Summed cross-entropy of ``logits`` (for every position but the last) over the supervised tokens, and
    their count."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch.input_ids[:, 1:]) * batch.targets
    return ce.sum(), batch.targets.sum()


class BatchOrder:
    """Which samples make up global batch ``step``: sorted by length into batches (little padding), the
    batch order shuffled each epoch from the seed. Depends only on (seed, step)."""

    def __init__(self, samples: List[Sample], batch_size: int, seed: int):
        if len(samples) < batch_size:
            raise TrainingError(f"The data has {len(samples)} samples, fewer than --batch-size {batch_size}.")
        by_length = sorted(range(len(samples)), key=lambda i: (len(samples[i].input_ids), i))
        self.batches = [by_length[i : i + batch_size] for i in range(0, len(by_length) - batch_size + 1, batch_size)]
        self.seed = seed

    def __call__(self, step: int) -> List[int]:
        epoch, index = divmod(step, len(self.batches))
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.batches))
        return self.batches[order[index]]


def shard(indices: List[int], group) -> List[int]:
    """This process's part of a global batch."""
    if len(indices) % group.size():
        raise TrainingError(f"--batch-size {len(indices)} must be divisible by the {group.size()} processes.")
    return indices[group.rank() :: group.size()]


def learning_rate_schedule(args: TrainingArgs) -> Callable[[mx.array], mx.array]:
    """The learning rate at each optimizer update (0, 1, ...), built by mlx-lm's ``build_schedule``: with
    ``warmup`` W, linear from 1 % of the peak at update 0 to the peak at update W; then the peak, or a
    cosine/linear decay that reaches 10 % of it at the last update."""
    peak = args.learning_rate
    last = args.iters // args.grad_accumulation_steps - 1
    first = args.warmup + 1 if args.warmup else 0  # build_schedule starts the main part after update W
    decay_steps = max(last - first, 1)
    after_warmup = {  # mlx.optimizers schedule and its arguments
        "constant": ("linear_schedule", [peak, peak, 1]),
        "cosine": ("cosine_decay", [peak, decay_steps, peak * 0.1]),
        "linear": ("linear_schedule", [peak, peak * 0.1, decay_steps]),
    }
    if args.lr_schedule not in after_warmup:
        raise TrainingError(f"Unknown --lr-schedule {args.lr_schedule!r}: use constant, cosine or linear.")
    name, arguments = after_warmup[args.lr_schedule]
    return build_schedule({"name": name, "arguments": arguments, "warmup": args.warmup, "warmup_init": peak * 0.01})


def make_optimizer(args: TrainingArgs, family: Family) -> optim.Optimizer:
    """The optimizer for every trainable weight; with ``patch_embedding_lr_scale`` != 1 the patch embedding
    gets its own, on the same schedule scaled (its output norm grows fast at the decoder's rate)."""
    schedule = learning_rate_schedule(args)
    if args.patch_embedding_lr_scale == 1.0:
        return _optimizer(args, schedule)
    scale = args.patch_embedding_lr_scale
    patch_embedding = _optimizer(args, lambda step: scale * schedule(step))
    return optim.MultiOptimizer(
        [_optimizer(args, schedule), patch_embedding], [lambda path, _: not family.is_patch_embedding(path)]
    )


def _optimizer(args: TrainingArgs, learning_rate) -> optim.Optimizer:
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=learning_rate)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=learning_rate, weight_decay=args.weight_decay)
    raise TrainingError(f"Unknown --optimizer {args.optimizer!r}: use adam or adamw.")


def evaluate(model: EVEModel, samples: List[Sample], image_processor, batch_size: int, num_batches: int) -> float:
    """Mean loss per supervised token over ``num_batches`` batches (-1: all), summed over all processes.
    Leaves the model in eval mode: no dropout, and no random numbers drawn."""
    model.eval()
    group = mx.distributed.init()
    order = BatchOrder(samples, batch_size, seed=0)
    count = len(order.batches) if num_batches < 0 else min(num_batches, len(order.batches))
    total, tokens = mx.array(0.0), mx.array(0)
    for i in range(count):
        batch = make_batch([samples[j] for j in shard(order(i), group)], image_processor)
        loss, n = loss_sum(model, batch)
        total, tokens = total + loss, tokens + n
        mx.eval(total, tokens)
    total = mx.distributed.all_sum(total, stream=mx.cpu)
    tokens = mx.distributed.all_sum(tokens, stream=mx.cpu)
    return (total / mx.maximum(tokens, 1)).item()


def save_checkpoint(adapter_path: Path, model: EVEModel, optimizer: optim.Optimizer, step: int) -> None:
    """Trainable weights and optimizer state as one folder, swapped in atomically, and the weights alone
    as ``adapters.safetensors`` for inference."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    staging = adapter_path / f"{CHECKPOINT}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    mx.save_safetensors(str(staging / ADAPTERS), weights)
    mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (staging / "state.json").write_text(json.dumps({"step": step}))
    final, old = adapter_path / CHECKPOINT, adapter_path / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.copy(final / ADAPTERS, adapter_path / f"{ADAPTERS}.tmp")
    (adapter_path / f"{ADAPTERS}.tmp").replace(adapter_path / ADAPTERS)


def find_checkpoint(adapter_path: Path) -> Optional[Path]:
    """The newest complete checkpoint folder. ``save_checkpoint`` swaps folders with two renames; a run killed
    between them leaves the new one as ``.incomplete`` (complete once its state.json, written last, is there)
    and the previous one as ``.old``."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.incomplete", f"{CHECKPOINT}.old"):
        if (adapter_path / name / "state.json").is_file():
            return adapter_path / name
    return None


def load_checkpoint(adapter_path: Path, model: EVEModel, optimizer: optim.Optimizer) -> int:
    """Restore a checkpoint written by ``save_checkpoint``; returns the step it was taken at."""
    folder = find_checkpoint(adapter_path)
    if folder is None:
        raise TrainingError(f"No checkpoint to resume from in {adapter_path}.")
    model.load_weights(str(folder / ADAPTERS), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return json.loads((folder / "state.json").read_text())["step"]


def finite_loss_after_update(model: EVEModel, batch: Batch, loss: Loss = loss_sum) -> float:
    """The loss on ``batch`` with the current weights (no dropout), summed over all processes."""
    model.eval()
    summed, tokens = loss(model, batch)
    model.train()
    total = mx.distributed.all_sum(mx.stack([summed, tokens.astype(mx.float32)]), stream=mx.cpu)
    return (total[0] / mx.maximum(total[1], 1)).item()


def diverged(what: str, saved: int, adapter_path: Path) -> TrainingError:
    if saved > 0:
        where = (
            f"The last good checkpoint (step {saved}) is in {adapter_path / CHECKPOINT}: resume from it with --resume"
        )
    else:
        where = "No checkpoint was saved before it"
    return TrainingError(f"{what}; training stopped. {where}, with a lower --learning-rate or a --max-grad-norm.")


class DivergenceWatch:
    """Warns when the training loss rises well above the lowest it has been (the first step's loss counts):
    a learning rate too high can undo training without ever making the loss NaN."""

    def __init__(self, factor: float = 1.5, margin: float = 0.1):
        self.factor, self.margin = factor, margin
        self.best: Optional[float] = None
        self.best_step = 0
        self.warned = False

    def step(self, loss: float) -> None:
        if self.best is None:
            self.best = loss

    def report(self, step: int, window_loss: float, say: Callable[[str], None]) -> None:
        limit = self.factor * self.best + self.margin
        if window_loss > limit and not self.warned:
            say(
                f"[WARNING] The training loss rose to {window_loss:.3f}, from {self.best:.3f} at step "
                f"{self.best_step or 1}: training is diverging. Try a lower --learning-rate."
            )
        self.warned = window_loss > limit
        if window_loss < self.best:
            self.best, self.best_step = window_loss, step


class StopRequest:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one interrupts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping: saving a checkpoint after this step (Ctrl-C again to abort).", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


class GradientSteps:
    """Training steps: each batch's loss and gradients, averaged over the processes, summed over
    ``grad_accumulation_steps`` batches, then one optimizer update."""

    def __init__(self, model: EVEModel, optimizer: optim.Optimizer, loss: Loss, args: TrainingArgs, group):
        self.model, self.optimizer, self.args, self.group = model, optimizer, args, group
        self.loss_and_grad = nn.value_and_grad(model, loss)
        self.accumulated = None  # the gradients summed since the last update

    def __call__(self, batch: Batch, step: int) -> Tuple[float, int]:
        """Step ``step`` on ``batch``: the global mean loss (before this step's update) and the tokens it is
        the mean over (those the loss counts)."""
        (summed, count), grads = self.loss_and_grad(self.model, batch)
        tokens = mx.distributed.all_sum(count, stream=mx.cpu)
        # Each process's summed loss times the process count over the global token count: averaging
        # the gradients over processes gives exactly the gradient of the global mean.
        scale = self.group.size() / mx.maximum(tokens, 1)
        step_loss = summed * scale
        grads = nn.average_gradients(tree_map(lambda g: g * scale, grads), self.group, communication_stream=mx.cpu)
        step_loss = mx.distributed.all_sum(step_loss, stream=mx.cpu) / self.group.size()
        self.accumulated = grads if self.accumulated is None else tree_map(mx.add, self.accumulated, grads)
        if step % self.args.grad_accumulation_steps == 0:
            self._update()
        mx.eval(self.model.parameters(), self.optimizer.state, step_loss)
        return step_loss.item(), int(tokens.item())

    def _update(self) -> None:
        grads, self.accumulated = self.accumulated, None
        if self.args.grad_accumulation_steps > 1:
            grads = tree_map(lambda g: g / self.args.grad_accumulation_steps, grads)
        if self.args.max_grad_norm is not None:
            grads = optim.clip_grad_norm(grads, self.args.max_grad_norm)[0]
        self.optimizer.update(self.model, grads)

    @property
    def between_updates(self) -> bool:
        return self.accumulated is None


class TrainingReport:
    """mlx-lm's training line every ``steps_per_report`` steps: the means since the last one."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.watch, self.trained_tokens = say, DivergenceWatch(), 0
        self._start_window()

    def _start_window(self) -> None:
        self.loss, self.tokens, self.steps, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.watch.step(loss)
        self.loss += loss
        self.tokens += tokens
        self.steps += 1
        self.seconds += seconds

    def show(self, step: int, learning_rate: float) -> None:
        self.trained_tokens += self.tokens
        self.say(
            f"Iter {step}: Train loss {self.loss / self.steps:.3f}, "
            f"Learning Rate {learning_rate:.3e}, "
            f"It/sec {self.steps / self.seconds:.3f}, Tokens/sec {self.tokens / self.seconds:.3f}, "
            f"Trained Tokens {self.trained_tokens}, Peak mem {mx.get_peak_memory() / 1e9:.3f} GB"
        )
        self.watch.report(step, self.loss / self.steps, self.say)
        self._start_window()


def train(
    model: EVEModel,
    image_processor,
    train_set: List[Sample],
    valid_set: Optional[List[Sample]],
    args: TrainingArgs,
    adapter_path: Path,
    resume: bool = False,
    report: Callable[[str], None] = print,
    loss: Loss = loss_sum,
) -> int:
    """Train ``model``'s trainable parameters; returns the last step done. Raises TrainingError on NaN.
    ``loss`` (summed loss, supervised tokens) is what is minimised, as in mlx-lm's ``train``; validation
    always reports the answer loss, ``loss_sum``."""
    group = mx.distributed.init()
    is_main = group.rank() == 0
    say = report if is_main else (lambda message: None)
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(args, model.family)
    start = load_checkpoint(adapter_path, model, optimizer) if resume else 0
    if resume:
        say(f"Resuming from step {start}.")
    order = BatchOrder(train_set, args.batch_size, args.seed)
    steps, reports, saved = GradientSteps(model, optimizer, loss, args, group), TrainingReport(say), start
    model.train()
    with StopRequest() as stop:
        step = start
        for step in range(start + 1, args.iters + 1):
            if valid_set and (step == 1 or step % args.steps_per_eval == 0 or step == args.iters):
                tic = time.perf_counter()
                val_loss = evaluate(model, valid_set, image_processor, args.batch_size, args.val_batches)
                model.train()
                say(f"Iter {step}: Val loss {val_loss:.3f}, Val took {time.perf_counter() - tic:.3f}s")
            tic = time.perf_counter()
            mx.random.seed((args.seed * 1_000_003 + step) % 2**64)  # MLX's random state can't be restored: derive it
            batch = make_batch([train_set[i] for i in shard(order(step - 1), group)], image_processor)
            loss_value, tokens = steps(batch, step)
            if not math.isfinite(loss_value):
                raise diverged(f"The loss became {loss_value} at step {step}", saved, adapter_path)
            reports.add(loss_value, tokens, time.perf_counter() - tic)
            if step % args.steps_per_report == 0 or step == args.iters:
                reports.show(step, optimizer.learning_rate.item())
            checkpoint_due = step % args.save_every == 0 or step == args.iters or stop.requested
            if checkpoint_due and steps.between_updates:
                # A checkpoint is good only if the loss on its weights is finite: the loss above was on
                # the weights before this step's update.
                after = finite_loss_after_update(model, batch, loss)
                if not math.isfinite(after):
                    raise diverged(f"The loss became {after} after the update of step {step}", saved, adapter_path)
                if is_main:
                    save_checkpoint(adapter_path, model, optimizer, step)
                saved = step
                say(f"Iter {step}: Saved checkpoint to {adapter_path / CHECKPOINT}.")
            if stop.requested and saved == step:
                say(f"Stopped at step {step}; resume with --resume.")
                break
    return step


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """Trainable and total parameters, a quantized weight counted at its real size as mlx-lm does."""
    # mlx-lm's total covers leaf modules only: add the arrays modules hold beside submodules (EVEv2's
    # class and split embeddings, LoRA's A and B), or full fine-tuning reports more than 100 %.
    beside = sum(
        v.size
        for _, m in model.named_modules()
        if tree_flatten(m.children())
        for v in m.values()
        if isinstance(v, mx.array)
    )
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model) + beside


def training_args(args: types.SimpleNamespace) -> TrainingArgs:
    """The training loop's share of the options."""
    return TrainingArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArgs)})
