"""Train (or evaluate) one regime: `python -m fmdist.train --config PATH [key=value ...]`.

Runs the same as one plain process, under `torchrun --nproc_per_node=N` and under
`accelerate launch`; see the README for the launch commands.
"""

from __future__ import annotations

import argparse
import sys
import time

from fmdist import distributed, plots
from fmdist.config import TrainConfig, keys_help, load_config, to_yaml
from fmdist.data import eval_loader, load_splits, train_loader
from fmdist.engine import compute_dtypes, evaluate, train_one_epoch
from fmdist.errors import FmdistError
from fmdist.optim import build_optimizer
from fmdist.outputs import (
    CONFIG_FILE,
    CURVES_FILE,
    EVAL_CONFIG_FILE,
    EVAL_FILE,
    HISTORY_FILE,
    SAMPLES_FILE,
    WEIGHTS_FILE,
    RunFolder,
)
from fmdist.regimes import build_model
from fmdist.transforms import BatchTransform

log = distributed.main_print


class _RankZeroArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        if distributed.is_main_process():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


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
    args = parse_args(argv)
    try:
        run(load_config(args.config, args.overrides))
    except FmdistError as e:
        distributed.main_print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        distributed.shutdown()
    return 0


def run(cfg: TrainConfig) -> list[dict] | dict:
    runtime = distributed.setup(cfg)
    accelerator = runtime.accelerator
    main_process = distributed.is_main_process()

    folder = RunFolder(cfg.output_dir)
    result_files = (EVAL_FILE,) if cfg.eval_only else (HISTORY_FILE, WEIGHTS_FILE)

    distributed.run_synced(lambda: folder.prepare(result_files, cfg.overwrite), on_this_rank=main_process)
    log(
        f"fmdist: {cfg.regime} {cfg.model.arch}, {runtime.world_size} process(es) on {runtime.device.type}, "
        f"batch {cfg.batch_size} per process ({cfg.batch_size * runtime.world_size} global), output {folder.path}"
    )

    train_split, test_split = load_splits(cfg.data, cfg.model.num_classes)
    log(
        f"fmdist: data {cfg.data.source}: {len(train_split)} training images from {train_split.origin}, "
        f"{len(test_split)} test images from {test_split.origin}"
    )
    test_batches = eval_loader(test_split, cfg.eval_batch_size, cfg.data.num_workers)
    train_batches = None if cfg.eval_only else train_loader(train_split, cfg.batch_size, cfg.seed, cfg.data.num_workers)
    model, counts = build_model(cfg)
    log(f"fmdist: parameters: {counts.trainable:,} trainable / {counts.total:,} total")

    # Written only now that data and weights are known to be good: a run that fails on bad
    # input leaves the folder as it found it.
    def write_run_description():
        folder.write_text(EVAL_CONFIG_FILE if cfg.eval_only else CONFIG_FILE, to_yaml(cfg))
        if not cfg.eval_only:
            plots.save_samples_grid(train_split.images, train_split.labels, train_split.classes, folder / SAMPLES_FILE)

    distributed.run_synced(write_run_description, on_this_rank=main_process)
    transform = BatchTransform.from_config(cfg, runtime.rank, runtime.device)

    optimizer = build_optimizer(cfg.optimizer, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    bare_model = accelerator.unwrap_model(model)
    dtypes = compute_dtypes(bare_model, transform(test_split.images[:2], train=False), accelerator)
    log(
        f"fmdist: mixed precision in effect: {runtime.mixed_precision} "
        f"(convolutions compute in {', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))})"
    )

    if cfg.eval_only:
        stats = evaluate(bare_model, test_batches, transform, accelerator)
        log(f"Validation Loss: {stats.loss:.6f}, Accuracy: {stats.accuracy:.6f} ({stats.count} images)")
        result = {"val_loss": stats.loss, "val_acc": stats.accuracy, "val_count": stats.count}
        distributed.run_synced(lambda: folder.write_json(EVAL_FILE, result), on_this_rank=main_process)
        return result

    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        train_batches.sampler.set_epoch(epoch)
        trained = train_one_epoch(model, train_batches, optimizer, transform, accelerator)
        log(f"Epoch: {epoch} \tTraining Loss: {trained.loss:.6f}")
        validated = evaluate(bare_model, test_batches, transform, accelerator)
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
                "train_images_per_sec": trained.images / trained.seconds if trained.seconds > 0 else 0.0,
            }
        )
        if main_process:
            folder.write_json(HISTORY_FILE, history)

    def save_results():
        folder.save_weights(bare_model.state_dict())
        plots.save_curves(history, folder / CURVES_FILE, title=f"{cfg.regime} {cfg.model.arch}")

    distributed.run_synced(save_results, on_this_rank=main_process)
    log(f"fmdist: done: best validation accuracy {max(r['val_acc'] for r in history):.4f}; results in {folder.path}")
    return history


if __name__ == "__main__":
    sys.exit(main())
