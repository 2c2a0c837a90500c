"""The trainer end to end, as real processes: plain python, torchrun (gloo on CPU) and accelerate launch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmdist import distributed, models
from fmdist.config import load_config
from fmdist.data import load_splits, train_loader
from fmdist.engine import EpochProgress, train_one_epoch
from fmdist.optim import build_optimizer
from fmdist.regimes import build_model
from fmdist.train import in_memory_format
from fmdist.transforms import BatchTransform

from helpers import (
    CONFIGS,
    LAUNCH_TIMEOUT,
    REPO,
    TINY_SYNTHETIC_RUN,
    free_port,
    launch_env,
    read_history,
    run_command,
    train,
    write_fashion_mnist_idx,
)

SMOKE = ("--config", str(CONFIGS / "smoke.yaml"))
HISTORY_KEYS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc",
    "val_count",
    "lr",
    "epoch_seconds",
    "wall_seconds",
    "train_images_per_sec",
}


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_smoke_run_learns_the_synthetic_task_and_writes_every_output(tmp_path):
    out = tmp_path / "smoke"
    result = train(tmp_path, *SMOKE, f"output_dir={out}")
    history = read_history(out)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert all(set(r) >= HISTORY_KEYS for r in history)
    assert history[-1]["val_acc"] >= 0.95 and history[-1]["val_count"] == 500
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "history.json", "curves.png", "samples.png", "model.pt"}
    assert load_config(out / "config.yaml").model.width == 16
    weights = torch.load(out / "model.pt", weights_only=True)
    models.resnet18(in_channels=1, num_classes=10, width=16).load_state_dict(weights, strict=True)
    for epoch, record in enumerate(history, start=1):
        assert lines_starting(result.stdout, f"Epoch: {epoch} \tTraining Loss: ") == [
            f"Epoch: {epoch} \tTraining Loss: {record['train_loss']:.6f}"
        ]
        assert (
            f"Epoch: {epoch} \tValidation Loss: {record['val_loss']:.6f}, Accuracy: {record['val_acc']:.6f}"
            in result.stdout
        )


def test_torchrun_two_processes_learn_and_only_rank_zero_prints(tmp_path):
    out = tmp_path / "ddp"
    result = train(tmp_path, *SMOKE, "data.test_size=499", f"output_dir={out}", nproc=2)
    history = read_history(out)
    assert history[-1]["val_acc"] >= 0.95
    assert [record["val_count"] for record in history] == [499] * 4  # no sampler padding counted
    assert "2 process(es)" in result.stdout and "batch 64 per process (128 global)" in result.stdout
    for epoch in range(1, 5):
        assert len(lines_starting(result.stdout, f"Epoch: {epoch} \tTraining Loss")) == 1
        assert len(lines_starting(result.stdout, f"Epoch: {epoch} \tValidation Loss")) == 1
    assert len(lines_starting(result.stdout, "fmdist: parameters")) == 1


def test_two_torchrun_nodes_with_c10d_rendezvous_equal_one_node_with_two_processes(tmp_path):
    args = (*SMOKE, "epochs=2", "deterministic=true")
    train(tmp_path, *args, f"output_dir={tmp_path / 'one_node'}", nproc=2)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=fmdist-test",
                "-m",
                "fmdist.train",
                *args,
                f"output_dir={tmp_path / 'two_nodes'}",
            ],
            # torchrun gives each of 2 local processes one thread; 1 local process gets
            # the same here so both runs use the same kernels
            cwd=tmp_path,
            env=launch_env({"OMP_NUM_THREADS": "1"}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    stdout = "".join(out for out, _ in outputs)
    assert "2 process(es) on cpu" in stdout and len(lines_starting(stdout, "Epoch: 2 \tValidation Loss")) == 1
    one, two = read_history(tmp_path / "one_node"), read_history(tmp_path / "two_nodes")
    assert [(r["train_loss"], r["val_loss"], r["val_acc"]) for r in one] == [
        (r["train_loss"], r["val_loss"], r["val_acc"]) for r in two
    ]


def accelerate_launch(tmp_path, launch_flags, *args):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_flags,
        "--main_process_port",
        str(free_port()),
        "-m",
        "fmdist.train",
        *args,
    ]
    # HF_HOME: no accelerate config of this machine's user applies to the flag-only launch
    return run_command(command, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})


@pytest.mark.parametrize(
    "launch_flags, processes",
    [
        (["--config_file", str(REPO / "launch/accelerate/cpu.yaml")], 1),
        (["--config_file", str(REPO / "launch/accelerate/multi_process.yaml")], 2),
        (["--multi_gpu", "--num_processes", "2"], 2),  # the README's form without a config file
    ],
    ids=["cpu.yaml", "multi_process.yaml", "multi_gpu-flag"],
)
def test_accelerate_launch_runs_one_cpu_process_or_two_gloo_processes(tmp_path, launch_flags, processes):
    out = tmp_path / "acc"
    result = accelerate_launch(tmp_path, launch_flags, *SMOKE, "epochs=1", f"output_dir={out}")
    assert f"{processes} process(es) on cpu" in result.stdout
    assert len(lines_starting(result.stdout, "Epoch: 1 \tValidation Loss")) == 1
    assert read_history(out)[0]["val_count"] == 500


def test_same_seed_gives_identical_runs_and_another_seed_does_not(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(
            tmp_path,
            *SMOKE,
            "epochs=2",
            "deterministic=true",
            f"seed={seed}",
            "data.augment=true",
            f"output_dir={tmp_path / name}",
        )
        runs[name] = (
            [(r["train_loss"], r["val_loss"]) for r in read_history(tmp_path / name)],
            torch.load(tmp_path / name / "model.pt", weights_only=True),
        )
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(runs["a"][1][k], runs["b"][1][k]) for k in runs["a"][1])
    assert runs["a"][0] != runs["c"][0]


# --------------------------------------------------------------------- exact distributed evaluation


@pytest.fixture(scope="module")
def trained_on_real_sample(tmp_path_factory, real_csv_split):
    """A narrow ResNet-18 trained briefly on the real images, and a 199-image real test set."""
    train_csv, test_csv = real_csv_split
    folder = tmp_path_factory.mktemp("exact_eval")
    test_199 = folder / "test199.csv"
    test_199.write_text("\n".join(test_csv.read_text().splitlines()[:200]) + "\n")  # header + 199 rows
    train(
        folder,
        "--config",
        str(CONFIGS / "scratch.yaml"),
        "data.source=csv",
        f"data.train_csv={train_csv}",
        f"data.test_csv={test_199}",
        "model.width=16",
        "epochs=2",
        "batch_size=32",
        f"output_dir={folder / 'run'}",
    )
    return folder / "run" / "model.pt", test_199, train_csv


def reference_metrics(weights_path, test_csv):
    """Loss and accuracy computed directly, in one batch, outside fmdist's loop."""
    from fmdist.csvdata import read_kaggle_csv

    model = models.resnet18(in_channels=1, num_classes=10, width=16)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    images, labels = read_kaggle_csv(test_csv, 10)
    with torch.no_grad():
        logits = model.eval()((images.unsqueeze(1).float() / 255 - 0.2860) / 0.3530)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).double().mean().item()


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_evaluation_counts_every_test_image_once_for_any_world_size(tmp_path, trained_on_real_sample, nproc):
    weights_path, test_csv, train_csv = trained_on_real_sample
    out = tmp_path / "eval"
    train(
        tmp_path,
        "--config",
        str(CONFIGS / "scratch.yaml"),
        "eval_only=true",
        f"model.init_from={weights_path}",
        "model.width=16",
        "data.source=csv",
        f"data.train_csv={train_csv}",
        f"data.test_csv={test_csv}",
        "eval_batch_size=16",
        "mixed_precision=no",  # the reference computes in fp32; auto is bf16 on CPUs with bf16 units
        f"output_dir={out}",
        nproc=nproc,
    )
    result = json.loads((out / "eval.json").read_text())
    expected_loss, expected_acc = reference_metrics(weights_path, test_csv)
    assert result["val_count"] == 199
    assert result["val_acc"] == pytest.approx(expected_acc, abs=1e-12)
    assert result["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert 0.3 < result["val_acc"] < 1.0, "weights should be trained but imperfect, or the check is weak"


def test_evaluation_after_each_epoch_counts_every_image_once_under_three_processes(tmp_path):
    """The per-epoch validation of a 3-process run equals a 1-process evaluation of its weights."""
    common = (*SMOKE, "epochs=1", "data.test_size=101", "mixed_precision=no", "eval_batch_size=8")
    train(tmp_path, *common, f"output_dir={tmp_path / 'three'}", nproc=3)
    (record,) = read_history(tmp_path / "three")
    train(
        tmp_path,
        *common,
        "eval_only=true",
        f"model.init_from={tmp_path / 'three' / 'model.pt'}",
        f"output_dir={tmp_path / 'one'}",
    )
    single = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert record["val_count"] == single["val_count"] == 101
    assert record["val_acc"] == pytest.approx(single["val_acc"], abs=1e-12)
    assert record["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


# ------------------------------------------------------------------------------- mixed precision


def test_bf16_training_step_runs_every_convolution_in_bf16(fresh_accelerate):
    cfg = load_config(CONFIGS / "smoke.yaml", ["mixed_precision=bf16", "data.train_size=128", "data.test_size=10"])
    runtime = distributed.setup(cfg)
    assert runtime.mixed_precision == "bf16"
    model, _ = build_model(cfg)
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    optimizer = build_optimizer(cfg.optimizer, model)
    model, optimizer = runtime.accelerator.prepare(model, optimizer)
    split, _ = load_splits(cfg.data, 10)
    stats = train_one_epoch(
        model,
        train_loader(split, 64, 0, cfg.data, runtime.device),
        optimizer,
        BatchTransform.from_config(cfg, rank=0, device=runtime.device),
        runtime.accelerator,
        epoch=1,
        progress=EpochProgress(),
        stop_requested=lambda: False,
    )
    assert len(seen) == 2 * 20  # 2 batches through ResNet-18's 20 convolutions
    assert {out for _, out in seen} == {torch.bfloat16}
    assert stats.images == 128 and torch.isfinite(torch.tensor(stats.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay in fp32"


def test_trainer_logs_the_precision_in_effect_and_falls_back_from_fp16_on_cpu_with_one_warning(tmp_path):
    # fp16 falls back to what auto chooses: bf16 where the CPU computes it natively, fp32 elsewhere.
    native = distributed.cpu_has_bf16_units()
    result = train(
        tmp_path,
        *SMOKE,
        "epochs=1",
        "mixed_precision=fp16",
        "data.train_size=256",
        "data.test_size=50",
        f"output_dir={tmp_path / 'fp16'}",
        nproc=2,
    )
    warnings = lines_starting(result.stderr, "fmdist: warning:")
    fallback = "bf16" if native else "fp32 (no)"
    assert len(warnings) == 1 and "fp16 needs a CUDA GPU" in warnings[0] and f"using {fallback}" in warnings[0]
    in_effect = "bf16 (convolutions compute in bfloat16)" if native else "no (convolutions compute in float32)"
    assert f"mixed precision in effect: {in_effect}" in result.stdout
    assert read_history(tmp_path / "fp16")[0]["val_count"] == 50


def test_auto_precision_is_fp32_on_a_cpu_without_bf16_units_with_channels_last_model_and_batches(tmp_path):
    result = train(tmp_path, *SMOKE, "epochs=1", f"output_dir={tmp_path / 'fp32'}")
    expected = (
        "bf16 (convolutions compute in bfloat16)"
        if distributed.cpu_has_bf16_units()
        else "no (convolutions compute in float32)"
    )
    assert f"mixed precision in effect: {expected}; channels_last on" in result.stdout
    assert "mixed_precision: auto" in (tmp_path / "fp32" / "config.yaml").read_text()

    cfg = load_config(CONFIGS / "smoke.yaml", ["data.train_size=64", "data.test_size=8"])
    model, _ = build_model(cfg)
    model = in_memory_format(model, cfg)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    split, _ = load_splits(cfg.data, 10)
    batch = BatchTransform.from_config(cfg, rank=0, device=torch.device("cpu"))(split.images[:4], train=True)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_compiled_model_trains_and_saves_plain_state_dict_keys(tmp_path):
    args = (*SMOKE, "epochs=1", "data.train_size=256", "data.test_size=64", "model.width=8")
    result = train(tmp_path, *args, "compile=true", f"output_dir={tmp_path / 'compiled'}", timeout=600)
    assert "torch.compile on" in result.stdout
    train(tmp_path, *args, f"output_dir={tmp_path / 'eager'}")
    compiled = torch.load(tmp_path / "compiled" / "model.pt", weights_only=True)
    eager = torch.load(tmp_path / "eager" / "model.pt", weights_only=True)
    assert compiled.keys() == eager.keys()
    assert read_history(tmp_path / "compiled")[0]["val_count"] == 64


# --------------------------------------------------------------------------------- sources, weights


def test_torchvision_source_trains_from_idx_files_offline_under_torchrun(tmp_path, real_sample):
    images, labels = real_sample
    write_fashion_mnist_idx(tmp_path / "data", images, labels, train_count=800)
    out = tmp_path / "tv"
    result = train(
        tmp_path,
        "--config",
        str(CONFIGS / "scratch.yaml"),
        "data.source=torchvision",
        "data.root=data",
        "model.width=16",
        "epochs=1",
        "batch_size=64",
        f"output_dir={out}",
        nproc=2,
    )
    assert "800 training images" in result.stdout
    assert read_history(out)[0]["val_count"] == len(labels) - 800


def test_pretrained_regime_loads_named_weights_from_torch_home_under_torchrun(tmp_path):
    import torchvision

    torch_home = tmp_path / "torch_home"
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    out = tmp_path / "pre"
    result = train(
        tmp_path,
        "--config",
        str(CONFIGS / "pretrained.yaml"),
        *TINY_SYNTHETIC_RUN,
        f"output_dir={out}",
        nproc=2,
        env={"TORCH_HOME": str(torch_home)},
    )
    assert "11,175,370 trainable / 11,175,370 total" in result.stdout
    assert read_history(out)[0]["val_count"] == 64


def test_pretrained_offline_without_cache_fails_once_on_rank_zero(tmp_path):
    result = train(
        tmp_path,
        "--config",
        str(CONFIGS / "frozen.yaml"),
        "data.source=synthetic",
        "data.train_size=64",
        "data.test_size=8",
        "batch_size=16",
        f"output_dir={tmp_path / 'x'}",
        nproc=2,
        check=False,
        env={"TORCH_HOME": str(tmp_path / "empty")},
    )
    assert result.returncode != 0
    errors = lines_starting(result.stderr, "fmdist: error:")
    assert len(errors) == 1
    assert "resnet18-f37072fd.pth" in errors[0] and str(tmp_path / "empty" / "hub" / "checkpoints") in errors[0]


# --------------------------------------------------------------------------- real data, run folder


def test_real_sample_reaches_65_percent(tmp_path, real_csv_split, real_sample):
    train_csv, test_csv = real_csv_split
    held_out = len(real_sample[1]) - 800
    out = tmp_path / "real"
    train(
        tmp_path,
        "--config",
        str(CONFIGS / "scratch.yaml"),
        "data.source=csv",
        f"data.train_csv={train_csv}",
        f"data.test_csv={test_csv}",
        "epochs=6",
        "batch_size=32",
        f"output_dir={out}",
        timeout=600,
    )
    history = read_history(out)
    assert [r["val_count"] for r in history] == [held_out] * 6
    assert max(r["val_acc"] for r in history) >= 0.65, [r["val_acc"] for r in history]


def test_console_script_is_installed():
    result = run_command([str(Path(sys.executable).parent / "fmdist-train"), "--help"], cwd=REPO)
    assert "model.arch = resnet18" in result.stdout
