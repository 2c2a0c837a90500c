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
import resource
import sys
import warnings
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


def silence_library_warnings_off_main() -> None:
    """Only rank 0 speaks: the other ranks would repeat each library warning once per process."""
    if not is_main_process():
        warnings.filterwarnings("ignore")


def _all_reduce(values: list[float], op: str) -> list[float]:
    # float64 keeps counts and loss sums exact
    tensor = torch.tensor(values, dtype=torch.float64)
    if _initialized() and world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.cpu().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over all ranks."""
    return _all_reduce(values, "SUM")


def any_rank_flags(flags: list[bool]) -> list[bool]:
    """For each flag: is it set on any rank? One tiny collective; every rank gets the same answer."""
    return [value > 0 for value in _all_reduce([float(f) for f in flags], "MAX")]


def copy_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm statistics, which each rank updates from
    its own batches)."""
    if _initialized() and world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (_initialized() and world_size() > 1):
        return [obj]
    objects: list = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def restart_count() -> int:
    """How often torchrun has restarted this worker group after a failure (0 on the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def elastic_run_id() -> str:
    """The rendezvous id torchrun gives every attempt of one launch ('' outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def _attempt(fn: Callable[[], T], on_this_rank: bool) -> tuple[T | None, BaseException | None]:
    if not on_this_rank:
        return None, None
    try:
        return fn(), None
    except Exception as e:  # shared below so that no other rank waits forever for this one
        return None, e


def _share_outcome(result, error: BaseException | None, from_rank: int | None):
    """Collective: if any rank failed, every rank raises.

    The failing rank raises its own exception (a FmdistError prints as one line, anything else
    with its traceback); the others raise a FmdistError carrying the same message, so all end
    together instead of waiting for a rank that is gone. Returns rank `from_rank`'s result, or
    this rank's own when from_rank is None.
    """
    failure = None
    if error is not None:
        failure = (isinstance(error, FmdistError), str(error) if isinstance(error, FmdistError) else repr(error))
    outcomes = gather_objects((failure, result if from_rank is not None else None))
    failed = next(((r, f) for r, (f, _) in enumerate(outcomes) if f is not None), None)
    if failed is not None:
        if error is not None:
            raise error
        failed_rank, (user_error, message) = failed
        raise FmdistError(message if user_error else f"rank {failed_rank} failed: {message}")
    return result if from_rank is None else outcomes[from_rank][1]


def run_synced(fn: Callable[[], T], on_this_rank: bool) -> T | None:
    """Run `fn` where `on_this_rank` is true; a failure there is raised on every rank."""
    result, error = _attempt(fn, on_this_rank)
    return _share_outcome(result, error, from_rank=None)


def decide_on_main(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn`; every rank gets its result (or fails with it)."""
    result, error = _attempt(fn, is_main_process())
    return _share_outcome(result, error, from_rank=0)


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
    if requested == "auto":
        if device_type != "cuda":
            return "bf16" if cpu_has_bf16_units() else "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device_type != "cuda":
        # What auto would choose: bf16 only where the CPU computes it natively, fp32 elsewhere.
        fallback = "bf16" if cpu_has_bf16_units() else "no"
        warn(
            "mixed_precision=fp16 needs a CUDA GPU (CPU autocast has no fp16 with loss scaling); "
            f"using {fallback if fallback == 'bf16' else 'fp32 (no)'}"
        )
        return fallback
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        warn("this GPU has no bf16 support; using mixed_precision=fp16")
        return "fp16"
    return requested


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 autocast is
    emulated and runs several times slower than fp32 (ResNet-18 at 28x28 on an AVX2-only CPU: 36
    against 329 images/s)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """init_process_group with a key space of its own for each torchrun restart of the group.

    torchrun keeps its rendezvous store across restarts; without a prefix, a restarted group can
    read the addresses of the group it replaces and fail with "Gloo connectFullMesh failed ...
    Connection refused". Accelerate then uses this process group as it finds it.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=not agent_hosts_store and rank() == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    attempt_store = dist.PrefixStore(f"fmdist/attempt-{restart_count()}", store)
    dist.init_process_group(backend, store=attempt_store, rank=rank(), world_size=world_size(), timeout=timeout)


def setup(cfg) -> Runtime:
    """Start the process group and device through Accelerate, seed every library."""
    from accelerate import Accelerator

    silence_library_warnings_off_main()
    use_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.mixed_precision, "cpu" if use_cpu else "cuda")
    if world_size() > 1 and "MASTER_ADDR" in os.environ and not _initialized():
        _init_process_group("gloo" if use_cpu else "nccl", timeout=datetime.timedelta(minutes=10))
    accelerator = Accelerator(
        mixed_precision=precision, cpu=use_cpu, dynamo_backend="inductor" if cfg.compile else "no"
    )
    seed_everything(cfg.seed, cfg.deterministic)
    if not use_cpu:
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = not cfg.deterministic
    return Runtime(
        accelerator=accelerator,
        device=accelerator.device,
        mixed_precision=precision,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
    )


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory, and the peak GPU memory allocated on its device."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # ru_maxrss is in KiB
    if device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def shutdown() -> None:
    """End the run's process group, and Accelerate's process-wide state with it: another run in the
    same process (fmdist-compare --nproc 1, fmdist.seeds) may want another precision or device."""
    if _initialized():
        dist.destroy_process_group()
    accelerate_state = sys.modules.get("accelerate.state")  # absent when setup never ran
    if accelerate_state is not None:
        accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
