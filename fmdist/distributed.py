"""The one place that knows about processes: Accelerate setup, ranks, collectives and rank-0 output.

Every launcher (plain python, torchrun, accelerate launch) sets the same RANK / LOCAL_RANK /
WORLD_SIZE variables; Accelerate reads them, starts the process group (gloo on CPU, nccl on
GPU), places the model and applies mixed precision. The rest of fmdist asks `is_main_process()`
and friends instead of reading the environment.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from fmdist.errors import FmdistError

T = TypeVar("T")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return rank() == 0


def is_local_main_process() -> bool:
    return local_rank() == 0


def main_print(*args, file=None, **kwargs) -> None:
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


def warn(message: str) -> None:
    main_print(f"fmdist: warning: {message}", file=sys.stderr)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks, in float64 so counts and loss sums stay exact."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if _initialized() and world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def sync_error(error: FmdistError | None) -> None:
    """Collective: if any rank failed, every rank raises the first failure (so none waits forever)."""
    if not (_initialized() and world_size() > 1):
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise FmdistError(first)


def run_synced(fn: Callable[[], T], on_this_rank: bool) -> T | None:
    """Run `fn` where `on_this_rank` is true; a FmdistError there is raised on every rank."""
    result, error = None, None
    if on_this_rank:
        try:
            result = fn()
        except FmdistError as e:
            error = e
    sync_error(error)
    return result


def local_main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on each node's local rank 0 first (e.g. a download), then on the other ranks.

    The others then find the files in place. A failure on any rank stops every rank.
    """
    first = run_synced(fn, on_this_rank=is_local_main_process())
    later = run_synced(fn, on_this_rank=not is_local_main_process())
    return first if is_local_main_process() else later


@dataclass
class Runtime:
    """What the rest of the run needs to know about where it executes."""

    accelerator: object  # accelerate.Accelerator
    device: torch.device
    mixed_precision: str  # in effect, after any fallback
    world_size: int
    rank: int


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """The precision that can actually run here; warn once about any fallback."""
    if requested == "fp16" and device_type != "cuda":
        warn("mixed_precision=fp16 needs a CUDA GPU (CPU autocast has no fp16 with loss scaling); using bf16")
        return "bf16"
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        warn("this GPU has no bf16 support; using mixed_precision=fp16")
        return "fp16"
    return requested


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def setup(cfg) -> Runtime:
    """Start the process group and device through Accelerate, seed every library."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.mixed_precision, "cpu" if use_cpu else "cuda")
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=10))
    accelerator = Accelerator(mixed_precision=precision, cpu=use_cpu, kwargs_handlers=[timeout])
    seed_everything(cfg.seed, cfg.deterministic)
    return Runtime(
        accelerator=accelerator,
        device=accelerator.device,
        mixed_precision=precision,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
    )


def shutdown() -> None:
    if _initialized():
        dist.destroy_process_group()
