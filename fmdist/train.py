"""Train (or evaluate) one regime: `python -m fmdist.train --config PATH [key=value ...]`.

Runs the same as one plain process, under `torchrun --nproc_per_node=N` and under
`accelerate launch`; see the README for the launch commands, resuming and exit codes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from fmdist import distributed, plots
from fmdist.checkpoints import (
    FORMAT_VERSION,
    CheckpointStore,
    Position,
    capture_rng,
    load_checkpoint,
    restore_rng,
)
from fmdist.config import TrainConfig, keys_help, load_config, to_yaml
from fmdist.data import eval_loader, load_splits, train_loader
from fmdist.engine import EpochProgress, TrainingDiverged, compute_dtypes, evaluate, train_one_epoch
from fmdist.errors import FmdistError
from fmdist.models import forward_gflops
from fmdist.optim import build_ema, build_optimizer, build_scheduler
from fmdist.outputs import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    EVAL_CONFIG_FILE,
    EVAL_FILE,
    HISTORY_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    RunFolder,
)
from fmdist.preemption import (
    Checkpointed,
    StopSignals,
    mark_checkpointed,
    note_stopped_attempt,
    previous_attempt_stopped,
)
from fmdist.progress import make_progress
from fmdist.regimes import build_model
from fmdist.report import TRACKED_SUMMARY_KEYS, history_wall_seconds, run_summary
from fmdist.resume import check_same_run, data_digest, fingerprint, plan_start
from fmdist.tracking import Tracker
from fmdist.transforms import BatchTransform

log = distributed.main_print


class _RankZeroArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line like every other bad input, instead of argparse's usage block.
        distributed.main_print(f"fmdist: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(FmdistError.exit_code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _RankZeroArgumentParser(
        prog="fmdist-train",
        description="Train a ResNet on FashionMNIST in one regime (scratch, pretrained or frozen).",
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config file (keys below; `extends:` another file)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=5 model.arch=resnet50"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    launched = time.perf_counter()
    # First of all: a preemption during start-up (data, model, rendezvous) still ends in a checkpoint.
    stop = StopSignals().install()
    args = parse_args(argv)
    try:
        run(load_config(args.config, args.overrides), stop, launched)
    except FmdistError as e:
        distributed.main_print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code
    except Checkpointed as stopped:
        log(f"fmdist: {stopped}")
        return stopped.exit_code
    finally:
        stop.uninstall()
        distributed.shutdown()
    return 0


def run(cfg: TrainConfig, stop: StopSignals, launched: float) -> list[dict] | dict:
    """`stop`: the signal handlers, installed as early as main could; `launched`: when main started
    (perf_counter), so that a run's wall time includes its start-up."""
    runtime = distributed.setup(cfg)
    folder = RunFolder(cfg.output_dir)
    distributed.run_synced(folder.ensure_writable, on_this_rank=distributed.is_main_process())
    log(
        f"fmdist: {cfg.regime} {cfg.model.arch}, {runtime.world_size} process(es) on {runtime.device.type}, "
        f"batch {cfg.batch_size} per process ({cfg.batch_size * runtime.world_size} global), output {folder.path}"
    )
    train_split, test_split = load_splits(cfg.data, cfg.model.num_classes)
    log(
        f"fmdist: data {cfg.data.source}: {len(train_split)} training images from {train_split.origin}, "
        f"{len(test_split)} test images from {test_split.origin}"
    )
    test_batches = eval_loader(test_split, cfg.eval_batch_size, cfg.data, runtime.device)
    if cfg.eval_only:
        return _evaluate_only(cfg, runtime, folder, test_split, test_batches)
    return _train(cfg, runtime, folder, train_split, test_split, test_batches, stop, launched)


def in_memory_format(model, cfg):
    """The model in the memory format its batches come in (channels-last convolutions are faster)."""
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def log_model(cfg, model, counts) -> None:
    """The model's size, and its cost, which grows with the stem's resolution and data.image_size."""
    gflops = forward_gflops(model, cfg.model.in_channels, cfg.data.image_size)
    log(f"fmdist: parameters: {counts.trainable:,} trainable / {counts.total:,} total")
    size = cfg.data.image_size
    log(f"fmdist: {cfg.model.stem} stem, {size}x{size} input: {gflops:.3f} GFLOPs per image forward")


def _evaluate_only(cfg, runtime, folder: RunFolder, test_split, test_batches) -> dict:
    if (folder / EVAL_FILE).exists() and not cfg.overwrite:
        raise FmdistError(f"output_dir {folder.path} already holds {EVAL_FILE}; set overwrite=true to replace it")
    model, counts = build_model(cfg)
    log_model(cfg, model, counts)
    model = runtime.accelerator.prepare(in_memory_format(model, cfg))
    bare_model = runtime.accelerator.unwrap_model(model, keep_torch_compile=False)
    transform = BatchTransform.from_config(cfg, runtime.rank, runtime.device)
    stats = evaluate(bare_model, test_batches, transform, runtime.accelerator, cfg.model.num_classes, cfg.eval_flip)
    log(f"Validation Loss: {stats.loss:.6f}, Accuracy: {stats.accuracy:.6f} ({stats.count} images)")
    result = {"val_loss": stats.loss, "val_acc": stats.accuracy, "val_count": stats.count}

    def write():
        folder.write_text(EVAL_CONFIG_FILE, to_yaml(cfg))
        folder.write_json(EVAL_FILE, result)

    distributed.run_synced(write, on_this_rank=distributed.is_main_process())
    return result


def _train(cfg, runtime, folder: RunFolder, train_split, test_split, test_batches, stop, launched) -> list[dict]:
    accelerator = runtime.accelerator
    main_process = distributed.is_main_process()
    train_batches = train_loader(train_split, cfg.batch_size, cfg.seed, cfg.data, runtime.device)
    store = CheckpointStore(folder / CHECKPOINT_DIR)
    restarts, elastic_run = distributed.restart_count(), distributed.elastic_run_id()
    if distributed.decide_on_main(lambda: previous_attempt_stopped(folder.path, restarts, elastic_run)):
        raise Checkpointed(
            f"torchrun restarted the workers after a stop signal ended attempt {restarts - 1}; not training on "
            f"(exit code {Checkpointed.exit_code}); run the same command again to resume",
            None,
        )
    plan = distributed.decide_on_main(lambda: plan_start(cfg, folder, store, restarts > 0))
    for note in plan.notes:
        distributed.warn(note)

    model, counts = build_model(cfg, initial_weights=plan.resume_from is None)
    model = in_memory_format(model, cfg)
    log_model(cfg, model, counts)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.batch_size * runtime.world_size)
    transform = BatchTransform.from_config(cfg, runtime.rank, runtime.device)
    run_fingerprint = fingerprint(
        cfg, runtime.world_size, runtime.mixed_precision, data_digest(train_split, test_split)
    )
    checkpoint = None
    if plan.resume_from is not None:
        checkpoint = load_checkpoint(plan.resume_from)
        check_same_run(checkpoint["fingerprint"], run_fingerprint, plan.resume_from)
        load_model_and_optimizer(checkpoint, model, optimizer, plan.resume_from)

    # Written only now that data, weights and checkpoint are known to be good: a run that
    # fails on bad input leaves the folder as it found it.
    def write_run_description():
        folder.remove_unfinished_writes()
        if plan.replaces_earlier_run:
            store.clear(keep=plan.resume_from)
            folder.remove_results()
        folder.write_text(CONFIG_FILE, to_yaml(cfg))
        plots.save_samples_grid(train_split.images, train_split.labels, train_split.classes, folder / SAMPLES_FILE)

    distributed.run_synced(write_run_description, on_this_rank=main_process)

    model, optimizer = accelerator.prepare(model, optimizer)
    bare_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    # Stepped here every iteration, not through Accelerate (which would step it once per process).
    scheduler = build_scheduler(cfg.optimizer, optimizer, len(train_batches), cfg.epochs)
    ema = build_ema(bare_model, cfg.ema_decay)
    dtypes = compute_dtypes(bare_model, transform(test_split.images[:2], train=False), accelerator)
    log(
        f"fmdist: mixed precision in effect: {runtime.mixed_precision} "
        f"(convolutions compute in {', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}); "
        f"channels_last {'on' if cfg.channels_last else 'off'}; torch.compile {'on' if cfg.compile else 'off'}"
    )

    history: list[dict] = []
    start, partial = Position(0), EpochProgress()
    earlier_seconds = 0.0  # wall time of the epochs earlier launches of this run completed
    if checkpoint is not None:
        if checkpoint.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"][runtime.rank], transform.generator)
        if ema is not None and checkpoint.get("ema") is not None:
            ema.load_state_dict(checkpoint["ema"])
        if checkpoint.get("scheduler") is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr  # building the scheduler reset it to the first step's
        history = checkpoint["history"]
        start = Position(checkpoint["epoch"], checkpoint["step"])
        if start.step:
            partial = EpochProgress(step=start.step, **(checkpoint["partial"] if main_process else {}))
        earlier_seconds = (history_wall_seconds(history) if history else 0.0) + partial.seconds
        log(f"fmdist: resuming from {plan.resume_from} ({start.describe()})")
        checkpoint = None  # the optimizer and model hold their own copies now

    def save_checkpoint(position: Position, progress: EpochProgress | None, periodic: bool, best: bool, stopping=False):
        rng_states = distributed.gather_objects(capture_rng(transform.generator))

        def write():
            state = {
                "format": FORMAT_VERSION,
                "epoch": position.epoch,
                "step": position.step,
                "partial": None
                if progress is None
                else {"loss_sum": progress.loss_sum, "images": progress.images, "seconds": progress.seconds},
                "model": bare_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "history": history,
                "rng": rng_states,
                "fingerprint": run_fingerprint,
            }
            path = store.save(state, position, periodic=periodic, best=best, keep=cfg.keep_checkpoints)
            if stopping:  # before the other ranks are released to exit, and a supervisor with them
                mark_checkpointed(path)
                if elastic_run:
                    note_stopped_attempt(folder.path, elastic_run)
            return path

        return distributed.decide_on_main(write)

    num_classes = cfg.model.num_classes
    if start.epoch >= cfg.epochs:
        log(f"fmdist: the run is already complete ({start.epoch} epochs done); writing its final outputs")
        final = evaluate(bare_model, test_batches, transform, accelerator, num_classes, cfg.eval_flip)
        _write_final_outputs(cfg, runtime, folder, bare_model, history, final, counts, test_split.classes, Tracker())
        return history

    tracker = distributed.run_synced(lambda: Tracker.start(cfg, folder.path), on_this_rank=main_process) or Tracker()
    display = make_progress(cfg.progress, cfg.progress_every, cfg.epochs, cfg.batch_size * runtime.world_size)
    best_accuracy = max((record["val_acc"] for record in history), default=-1.0)
    for epoch in range(start.epoch + 1, cfg.epochs + 1):
        progress = partial if epoch == start.epoch + 1 else EpochProgress()
        epoch_start = time.perf_counter()
        train_batches.sampler.set_epoch(epoch, skip_batches=progress.step)
        display.start_epoch(epoch, progress.step, progress.step + len(train_batches))
        trained = train_one_epoch(
            model, train_batches, optimizer, transform, accelerator, epoch, progress, stop.requested, display.step,
            scheduler=scheduler, label_smoothing=cfg.label_smoothing, ema=ema,
        )  # fmt: skip
        display.end_epoch()
        if isinstance(trained, EpochProgress):
            path = save_checkpoint(Position(epoch - 1, trained.step), trained, periodic=True, best=False, stopping=True)
            raise Checkpointed(_stopped_message(stop, f"epoch {epoch}, step {trained.step}", path), path)
        log(f"Epoch: {epoch} \tTraining Loss: {trained.loss:.6f}")
        # Each rank's last step updated its BatchNorm statistics from its own batch; evaluate
        # with rank 0's, the ones DDP broadcasts at the next step and the checkpoint saves.
        distributed.copy_buffers_from_main(bare_model)
        validated = evaluate(bare_model, test_batches, transform, accelerator, num_classes, cfg.eval_flip)
        if not math.isfinite(validated.loss):  # the epoch's last step broke the weights: save nothing of them
            raise TrainingDiverged(
                f"validation loss is {validated.loss} after epoch {epoch}; stopped without saving, "
                "the checkpoints written before stay"
            )
        log(f"Epoch: {epoch} \tValidation Loss: {validated.loss:.6f}, Accuracy: {validated.accuracy:.6f}")
        history.append(
            {
                "epoch": epoch,
                "train_loss": trained.loss,
                "val_loss": validated.loss,
                "val_acc": validated.accuracy,
                "val_count": validated.count,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": time.perf_counter() - epoch_start,
                "wall_seconds": earlier_seconds + time.perf_counter() - launched,
                "train_images_per_sec": trained.images / trained.seconds if trained.seconds > 0 else 0.0,
            }
        )
        if ema is not None:
            distributed.copy_buffers_from_main(ema.module)  # as for the raw model above
            averaged = evaluate(ema.module, test_batches, transform, accelerator, num_classes, cfg.eval_flip)
            log(f"Epoch: {epoch} \tEMA Validation Loss: {averaged.loss:.6f}, Accuracy: {averaged.accuracy:.6f}")
            history[-1].update(ema_val_loss=averaged.loss, ema_val_acc=averaged.accuracy)
        if main_process:
            folder.write_json(HISTORY_FILE, history)
        tracker.log_epoch(history[-1])

        best = validated.accuracy > best_accuracy
        best_accuracy = max(best_accuracy, validated.accuracy)
        periodic = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
        # A stop after the last epoch is no stop: the run finishes.
        stopping = distributed.any_rank_flags([stop.requested()])[0] and epoch < cfg.epochs
        if periodic or best or stopping:
            path = save_checkpoint(Position(epoch), None, periodic=periodic or stopping, best=best, stopping=stopping)
        if stopping:
            raise Checkpointed(_stopped_message(stop, f"the end of epoch {epoch}", path), path)

    _write_final_outputs(cfg, runtime, folder, bare_model, history, validated, counts, test_split.classes, tracker)
    log(f"fmdist: done: best validation accuracy {best_accuracy:.4f}; results in {folder.path}")
    return history


def load_model_and_optimizer(checkpoint: dict, model, optimizer, path) -> None:
    """A checkpoint can match the run's fingerprint and still not fit (edited, or from a changed
    fmdist): say which file, in one line, before anything is written."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())
        raise FmdistError(f"{path}: checkpoint does not fit this run's model or optimizer ({reason[:300]})") from None


def _write_final_outputs(cfg, runtime, folder: RunFolder, bare_model, history, final, counts, classes, tracker):
    """model.pt, curves.png, confusion.png and summary.json; then the W&B run's images and summary."""
    gflops = forward_gflops(bare_model, cfg.model.in_channels, cfg.data.image_size)
    summary = run_summary(cfg, runtime.world_size, counts, history, final.confusion, classes, gflops)
    peaks = distributed.gather_objects(distributed.peak_memory_mb(runtime.device))
    summary.update(peaks[0])  # rank 0's, and every process's beside it
    summary["peak_rss_mb_per_process"] = [peak["peak_rss_mb"] for peak in peaks]

    def write():
        folder.write_json(HISTORY_FILE, history)
        folder.save_weights(bare_model.state_dict())
        title = f"{cfg.regime} {cfg.model.arch}"
        plots.save_curves(history, folder / CURVES_FILE, title=title)
        plots.save_confusion(final.confusion, classes, folder / CONFUSION_FILE, title=f"{title}, final epoch")
        folder.write_json(SUMMARY_FILE, summary)
        images = {
            "curves": folder / CURVES_FILE,
            "confusion": folder / CONFUSION_FILE,
            "samples": folder / SAMPLES_FILE,
        }
        tracker.finish({k: summary[k] for k in TRACKED_SUMMARY_KEYS}, images, step=history[-1]["epoch"])

    distributed.run_synced(write, on_this_rank=distributed.is_main_process())


def _stopped_message(stop: StopSignals, where: str, path) -> str:
    cause = stop.received or "a stop signal on another rank"
    return (
        f"stopped by {cause} at {where}; checkpoint {path} saved; "
        f"run the same command again to resume (exit code {Checkpointed.exit_code})"
    )


if __name__ == "__main__":
    sys.exit(main())
