"""One training epoch and one exact evaluation pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmdist import distributed
from fmdist.errors import FmdistError


@dataclass
class TrainStats:
    loss: float  # mean over every image of the epoch, all ranks
    images: int  # images seen by all ranks together
    seconds: float


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    count: int  # images evaluated over all ranks: exactly the test set size
    confusion: list[list[int]]  # [true class][predicted class] -> images


@dataclass
class EpochProgress:
    """How far an epoch has come. When an epoch stops early, loss_sum and images hold the totals
    over all ranks; a resumed epoch starts from them on rank 0 and from zero elsewhere."""

    step: int = 0  # batches done
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0


class TrainingDiverged(FmdistError):
    exit_code = 3


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer,
    transform,
    accelerator,
    epoch: int,
    progress: EpochProgress,
    stop_requested: Callable[[], bool],
    on_step: Callable[[int, torch.Tensor], None] = lambda step, loss: None,
    scheduler=None,
    label_smoothing: float = 0.0,
    ema=None,
) -> TrainStats | EpochProgress:
    """Train until the loader is exhausted (TrainStats) or a stop is requested (the EpochProgress to save).

    After every step all ranks agree on two flags, so they stop at the same step: a stop
    request on any rank, and a non-finite loss on any rank (which ends the run).
    """
    model.train()
    loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=accelerator.device)
    images_seen, step = progress.images, progress.step
    start = time.perf_counter()
    stopped = False
    for images, labels in loader:
        inputs = transform(images, train=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        finite = bool(torch.isfinite(loss))
        stopped, diverged = distributed.any_rank_flags([stop_requested(), not finite])
        if diverged:
            value = f"{loss.item()}" if not finite else "non-finite on another rank"
            raise TrainingDiverged(
                f"training loss is {value} at epoch {epoch}, step {step}; stopped without saving, "
                "the checkpoints written before stay"
            )
        loss_sum += loss.detach().double() * len(labels)
        images_seen += len(labels)
        on_step(step, loss)
        if stopped:
            break
    seconds = progress.seconds + time.perf_counter() - start
    total_loss, total_images = distributed.all_reduce_sum([loss_sum.item(), images_seen])
    if stopped:
        return EpochProgress(step=step, loss_sum=total_loss, images=int(total_images), seconds=seconds)
    return TrainStats(loss=total_loss / max(total_images, 1), images=int(total_images), seconds=seconds)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, transform, accelerator, num_classes: int, flip: bool = False) -> EvalStats:
    """Loss and accuracy over exactly the images the loader's shards hold, summed over ranks.
    With `flip`, the logits are the mean of those of each image and of its mirror image.

    `model` must be the unwrapped module: a DDP wrapper may synchronise buffers in forward,
    which would hang when ranks hold different numbers of test batches.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    for images, labels in loader:
        inputs = transform(images, train=False)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(inputs).float()
            if flip:
                logits = (logits + model(inputs.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    total_loss, *counts = distributed.all_reduce_sum([loss_sum.item(), *confusion.tolist()])
    matrix = torch.tensor(counts, dtype=torch.int64).reshape(num_classes, num_classes)
    total = int(matrix.sum())
    return EvalStats(
        loss=total_loss / max(total, 1),
        accuracy=int(matrix.trace()) / max(total, 1),
        count=total,
        confusion=matrix.tolist(),
    )


def compute_dtypes(model: nn.Module, inputs: torch.Tensor, accelerator) -> set[torch.dtype]:
    """The dtypes the convolutions actually produce under this run's autocast, from one forward pass."""
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), accelerator.autocast():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return seen
