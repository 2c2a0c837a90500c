"""The recipe's building blocks: weight-decay groups, the LR schedule and its scaling rule, random
erasing, label smoothing and flip test-time augmentation, and configs/recipe.yaml end to end."""

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmdist import distributed
from fmdist.config import TrainConfig, load_config
from fmdist.data import load_splits
from fmdist.engine import EpochProgress, evaluate, train_one_epoch
from fmdist.models import resnet18
from fmdist.optim import build_ema, build_optimizer, build_scheduler, lr_factor, parameter_groups, scaled_lr
from fmdist.transforms import BatchTransform

from helpers import CONFIGS, read_history, run_command, train

CPU = torch.device("cpu")


def test_weight_decay_skips_batchnorm_and_biases_and_frozen_parameters():
    model = resnet18(in_channels=1, num_classes=10)
    model.layer1.requires_grad_(False)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 or names[id(p)] == "fc.weight" for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"bn1.weight", "bn1.bias", "fc.bias"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert not any(names[id(p)].startswith("layer1.") for p in decay["params"] + no_decay["params"])
    assert len(parameter_groups(model, 0.0)) == 1


def test_optimizers_and_the_linear_scaling_rule():
    cfg = load_config(CONFIGS / "recipe.yaml").optimizer
    assert scaled_lr(cfg, 256) == pytest.approx(0.002) and scaled_lr(cfg, 512) == pytest.approx(0.004)
    assert scaled_lr(load_config(None).optimizer, 512) == 1e-3  # scale_lr off: lr as given
    model = resnet18(in_channels=1, num_classes=10, width=8)
    adamw = build_optimizer(cfg, model, global_batch=128)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == pytest.approx(0.001)
    sgd = build_optimizer(load_config(None, ["optimizer.name=sgd"]).optimizer, model)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_fused_update_is_the_reference_update(name):
    """fmdist's optimizers use the single-kernel (fused) implementations; they compute the same step."""
    cfg = load_config(None, [f"optimizer.name={name}", "optimizer.weight_decay=0.05", "optimizer.lr=0.01"]).optimizer
    torch.manual_seed(0)
    fused_model = resnet18(in_channels=1, num_classes=10, width=8)
    plain_model = copy.deepcopy(fused_model)
    fused = build_optimizer(cfg, fused_model)
    groups = parameter_groups(plain_model, cfg.weight_decay)
    plain = {
        "adam": lambda: torch.optim.Adam(groups, lr=0.01, foreach=False),
        "adamw": lambda: torch.optim.AdamW(groups, lr=0.01, foreach=False),
        "sgd": lambda: torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True, foreach=False),
    }[name]()
    assert fused.defaults["fused"]
    inputs, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    for (key, a), (_, b) in zip(fused_model.state_dict().items(), plain_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=key)


def test_warmup_then_cosine_schedule_values_per_iteration():
    assert [lr_factor(s, 100, 10, "cosine", 0.0) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, 100, 10, "cosine", 0.0) == 1.0
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(77, 100, 10, "constant", 0.0) == 1.0 and lr_factor(3, 100, 10, "constant", 0.0) == 0.4

    cfg = load_config(None, ["optimizer.schedule=cosine", "optimizer.warmup_epochs=0.5", "optimizer.min_lr_ratio=0.1",
                             "optimizer.lr=0.01"]).optimizer  # fmt: skip
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=0.01)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=2)
    used = []
    for _ in range(20):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])
    expected = [0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 15))) for k in range(15)]
    assert used[5:] == pytest.approx(expected)


def erasing_transform(p, seed=0, rank=0):
    return BatchTransform(28, 0.0, 1.0, 1, augment=False, channels_last=False, seed=seed, rank=rank, device=CPU,
                          erasing=p)  # fmt: skip


def test_random_erasing_zeroes_one_rectangle_per_chosen_image_reproducibly_and_only_in_training():
    images = torch.from_numpy(np.random.default_rng(0).integers(1, 256, (64, 28, 28), dtype=np.uint8))
    erased = erasing_transform(1.0)(images, train=True)
    assert erased.shape == (64, 1, 28, 28)
    for image in erased[:, 0]:
        zero = (image == 0).nonzero()
        rows, cols = zero[:, 0], zero[:, 1]
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert len(zero) == height * width  # one solid rectangle
        assert 0.015 * 784 <= len(zero) <= 0.34 * 784
    assert torch.equal(erased, erasing_transform(1.0)(images, train=True))
    assert not torch.equal(erased, erasing_transform(1.0, rank=1)(images, train=True))
    assert torch.equal(erasing_transform(1.0)(images, train=False), images.unsqueeze(1).float() / 255)
    some = erasing_transform(0.25, seed=3)(images, train=True)
    chosen = int(((some == 0).flatten(1).any(dim=1)).sum())
    assert 4 <= chosen <= 28  # about a quarter of 64


def test_flip_test_time_augmentation_averages_the_logits_of_both_views(fresh_accelerate):
    # fp32 on every CPU (auto picks bf16 on CPUs with bf16 units), so both sides compute alike.
    overrides = ["data.train_size=64", "data.test_size=37", "model.width=8", "mixed_precision=no"]
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    runtime = distributed.setup(cfg)
    torch.manual_seed(0)
    model = resnet18(in_channels=1, num_classes=10, width=8).eval()
    _, test_split = load_splits(cfg.data, 10)
    transform = BatchTransform.from_config(cfg, 0, CPU)
    batches = [(test_split.images, test_split.labels)]
    plain = evaluate(model, batches, transform, runtime.accelerator, 10)
    flipped = evaluate(model, batches, transform, runtime.accelerator, 10, flip=True)
    with torch.no_grad():
        inputs = transform(test_split.images, train=False)
        logits = (model(inputs) + model(inputs.flip(-1))) / 2
    expected_loss = torch.nn.functional.cross_entropy(logits, test_split.labels).item()
    assert flipped.loss == pytest.approx(expected_loss, rel=1e-5) and flipped.count == plain.count == 37
    expected_confusion = torch.zeros(10, 10, dtype=torch.int64)
    for label, prediction in zip(test_split.labels.tolist(), logits.argmax(1).tolist(), strict=True):
        expected_confusion[label, prediction] += 1
    assert flipped.confusion == expected_confusion.tolist()
    assert flipped.loss != pytest.approx(plain.loss)


def test_label_smoothing_is_in_the_training_loss_and_never_in_the_validation_loss(fresh_accelerate):
    overrides = [
        "data.train_size=64",
        "data.test_size=37",
        "model.width=8",
        "mixed_precision=no",
        "label_smoothing=0.1",
    ]
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    runtime = distributed.setup(cfg)
    torch.manual_seed(0)
    model = resnet18(in_channels=1, num_classes=10, width=8)
    before = copy.deepcopy(model)
    train_split, test_split = load_splits(cfg.data, 10)
    transform = BatchTransform.from_config(cfg, 0, CPU)
    inputs = transform(train_split.images, train=True)  # no augmentation in the smoke preset
    with torch.no_grad():
        logits = before.train()(inputs)
    optimizer = build_optimizer(cfg.optimizer, model)
    batches = [(train_split.images, train_split.labels)]  # one batch: the loss is taken before the only step
    trained = train_one_epoch(model, batches, optimizer, transform, runtime.accelerator, 1, EpochProgress(), lambda: False,
                              label_smoothing=cfg.label_smoothing)  # fmt: skip
    smoothed = F.cross_entropy(logits, train_split.labels, label_smoothing=0.1).item()
    assert trained.loss == pytest.approx(smoothed, rel=1e-5)
    assert trained.loss != pytest.approx(F.cross_entropy(logits, train_split.labels).item(), rel=1e-3)

    validated = evaluate(model, [(test_split.images, test_split.labels)], transform, runtime.accelerator, 10)
    with torch.no_grad():
        test_logits = model.eval()(transform(test_split.images, train=False))
    assert validated.loss == pytest.approx(F.cross_entropy(test_logits, test_split.labels).item(), rel=1e-5)


def test_evaluation_runs_in_inference_mode_with_larger_batches_and_training_does_not(fresh_accelerate):
    """Inference mode lets evaluation skip autograd's bookkeeping, which leaves room for larger batches."""
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.train_size=64", "data.test_size=37", "model.width=8"])
    runtime = distributed.setup(cfg)
    model = resnet18(in_channels=1, num_classes=10, width=8)
    modes = []
    model.register_forward_hook(lambda _module, _inputs, _output: modes.append(torch.is_inference_mode_enabled()))
    train_split, test_split = load_splits(cfg.data, 10)
    transform = BatchTransform.from_config(cfg, 0, CPU)
    optimizer = build_optimizer(cfg.optimizer, model)
    train_one_epoch(model, [(train_split.images, train_split.labels)], optimizer, transform, runtime.accelerator, 1,
                    EpochProgress(), lambda: False)  # fmt: skip
    assert modes == [False]
    test_batches = list(zip(test_split.images.split(20), test_split.labels.split(20), strict=True))
    evaluate(model, test_batches, transform, runtime.accelerator, 10, flip=True)
    assert modes == [False] + [True] * 4  # two batches, each seen plain and mirrored
    assert not torch.is_inference_mode_enabled()  # and it ends with evaluate
    defaults = TrainConfig()
    assert defaults.eval_batch_size > defaults.batch_size


def test_ema_is_evaluated_beside_the_raw_model_and_checkpointed(tmp_path):
    out = tmp_path / "ema"
    train(tmp_path, "--config", str(CONFIGS / "smoke.yaml"), "epochs=2", "ema_decay=0.9", "data.train_size=256",
          "data.test_size=64", "batch_size=32", f"output_dir={out}", nproc=2)  # fmt: skip
    history = read_history(out)
    for record in history:
        assert 0 <= record["ema_val_acc"] <= 1 and math.isfinite(record["ema_val_loss"])
        assert record["ema_val_loss"] != record["val_loss"]  # a different set of weights was evaluated
    checkpoint = torch.load(out / "checkpoints" / "epoch-0002.pt", weights_only=True)
    averaged, raw = checkpoint["ema"]["module.fc.weight"], checkpoint["model"]["fc.weight"]
    assert averaged.shape == raw.shape and not torch.equal(averaged, raw)
    assert checkpoint["ema"]["n_averaged"] == 2 * 4  # 4 steps per epoch (256 images, 2 x 32 per step)


def test_the_learning_rate_follows_the_global_batch_under_two_processes(tmp_path):
    args = ("--config", str(CONFIGS / "smoke.yaml"), "epochs=1", "optimizer.scale_lr=true", "optimizer.lr=0.004",
            "optimizer.reference_batch=64", "batch_size=32", "data.train_size=256", "data.test_size=64")  # fmt: skip
    train(tmp_path, *args, f"output_dir={tmp_path / 'one'}")
    train(tmp_path, *args, f"output_dir={tmp_path / 'two'}", nproc=2)
    one, two = read_history(tmp_path / "one")[0]["lr"], read_history(tmp_path / "two")[0]["lr"]
    assert one == pytest.approx(0.004 * 32 / 64) and two == pytest.approx(0.004 * 64 / 64)


def test_the_recipe_config_trains_with_its_schedule_and_smoothing(tmp_path):
    out = tmp_path / "recipe"
    train(tmp_path, "--config", str(CONFIGS / "recipe.yaml"), "epochs=3", "batch_size=64", "data.source=synthetic",
          "data.train_size=640", "data.test_size=100", "model.width=16", f"output_dir={out}")  # fmt: skip
    history = read_history(out)
    lr = 0.002 * 64 / 256  # scaled to the global batch
    steps = 10  # 640 images / 64
    expected = [lr * lr_factor(steps * epoch, 3 * steps, steps, "cosine", 0.01) for epoch in (1, 2, 3)]
    assert [r["lr"] for r in history] == pytest.approx(expected)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_count"] == 100
    saved = (out / "config.yaml").read_text()
    assert "label_smoothing: 0.1" in saved and "random_erasing: 0.25" in saved and "eval_flip: true" in saved
    assert "stem: cifar" in saved


def test_seeds_command_trains_every_config_and_seed_and_reports_mean_and_std(tmp_path):
    out = tmp_path / "seeds"
    # Every run shares one process: the second config's precision must not meet the first one's.
    (tmp_path / "bf16.yaml").write_text(f"extends: {CONFIGS / 'recipe.yaml'}\nmixed_precision: bf16\n")
    result = run_command(
        [sys.executable, "-m", "fmdist.seeds", "--config", str(CONFIGS / "tutorial.yaml"), "--config",
         str(tmp_path / "bf16.yaml"), "--seeds", "0", "1", "--output-dir", str(out), "data.source=synthetic",
         "data.train_size=128", "data.test_size=50", "epochs=1", "batch_size=32", "model.width=8"],
        cwd=tmp_path,
    )  # fmt: skip
    in_effect = [line.split(": ", 2)[2].split()[0] for line in result.stdout.splitlines()
                 if line.startswith("fmdist: mixed precision in effect")]  # fmt: skip
    assert in_effect == ["no", "no", "bf16", "bf16"]
    summary = json.loads((out / "seeds.json").read_text())
    assert list(summary) == ["tutorial", "bf16"]
    for name, numbers in summary.items():
        finals = [read_history(out / name / f"seed-{seed}")[-1]["val_acc"] for seed in (0, 1)]
        assert numbers["final"] == finals and numbers["runs"] == 2
        assert numbers["final_mean"] == pytest.approx(sum(finals) / 2)
        assert numbers["final_std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    tutorial = summary["tutorial"]
    row = f"| tutorial | 2 | 1 | {100 * tutorial['best_mean']:.1f}% ± {100 * tutorial['best_std']:.1f} |"
    assert row in (out / "seeds.md").read_text() and row in result.stdout


def test_ema_copies_then_averages_weights_and_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert build_ema(model, 0.0) is None
    ema = build_ema(model, 0.9)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update_parameters(model)  # the first update copies
    assert torch.equal(ema.module[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(4.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 3), 0.9 * 1.0 + 0.1 * 3.0))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 0.9 * 2.0 + 0.1 * 4.0))
    assert torch.equal(model[0].weight, torch.full((2, 3), 3.0))  # the model itself is untouched
