"""The three regimes: what trains, and a frozen backbone that really stays frozen."""

import pytest
import torch
import torchvision
from torch import nn

from fmdist import distributed
from fmdist.config import load_config
from fmdist.data import load_splits, train_loader
from fmdist.engine import EpochProgress, train_one_epoch
from fmdist.optim import build_optimizer
from fmdist.regimes import build_model
from fmdist.transforms import BatchTransform

from helpers import REPO, TINY_SYNTHETIC_RUN, read_history, train


@pytest.fixture
def imagenet_file(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "imagenet_r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def regime_cfg(regime, weights_path, **overrides):
    items = {
        "regime": regime,
        "model.weights": str(weights_path),
        "data.source": "synthetic",
        "data.train_size": 256,
        "data.test_size": 64,
        "batch_size": 32,
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def test_frozen_epoch_changes_conv1_and_fc_only_and_no_batchnorm_statistics(imagenet_file, fresh_accelerate):
    cfg = regime_cfg("frozen", imagenet_file, **{"model.stem_init": "rgb_sum"})
    runtime = distributed.setup(cfg)
    model, counts = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(cfg.optimizer, model)
    model, optimizer = runtime.accelerator.prepare(model, optimizer)
    train_split, _ = load_splits(cfg.data, cfg.model.num_classes)
    transform = BatchTransform.from_config(cfg, rank=0, device=runtime.device)

    loader = train_loader(train_split, 32, 0, cfg.data, runtime.device)
    train_one_epoch(model, loader, optimizer, transform, runtime.accelerator, 1, EpochProgress(), lambda: False)

    after = runtime.accelerator.unwrap_model(model).state_dict()
    trainable = {k for k in after if k.split(".")[0] in ("conv1", "fc")}
    assert trainable == {"conv1.weight", "fc.weight", "fc.bias"}
    for key in after:
        if key in trainable:
            assert not torch.equal(after[key], before[key]), f"{key} should have trained"
        else:
            assert torch.equal(after[key], before[key]), f"{key} is frozen but changed"
    assert counts.trainable == 64 * 7 * 7 + 512 * 10 + 10
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_frozen_optimizer_holds_only_trainable_parameters_and_batchnorm_stays_in_eval(imagenet_file):
    model, _ = build_model(regime_cfg("frozen", imagenet_file))
    optimizer = build_optimizer(load_config(None).optimizer, model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(model.conv1.weight), id(model.fc.weight), id(model.fc.bias)}
    model.train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert model.training and model.fc.training


@pytest.mark.parametrize("regime", ["scratch", "pretrained"])
def test_scratch_and_pretrained_train_everything(imagenet_file, regime):
    model, counts = build_model(regime_cfg(regime, imagenet_file))
    assert counts.trainable == counts.total
    model.train()
    assert all(m.training for m in model.modules())


def test_pretrained_starts_from_the_weights_and_scratch_does_not(imagenet_file):
    source = torch.load(imagenet_file, weights_only=True)
    pretrained, _ = build_model(regime_cfg("pretrained", imagenet_file))
    scratch, _ = build_model(regime_cfg("scratch", imagenet_file))
    assert torch.equal(pretrained.layer2[1].conv1.weight, source["layer2.1.conv1.weight"])
    assert not torch.equal(scratch.layer2[1].conv1.weight, source["layer2.1.conv1.weight"])


def test_frozen_backbone_survives_a_two_process_run_bit_for_bit(tmp_path, imagenet_file):
    out = tmp_path / "frozen"
    train(
        tmp_path,
        "--config",
        str(REPO / "configs/frozen.yaml"),
        f"model.weights={imagenet_file}",
        *TINY_SYNTHETIC_RUN,
        f"output_dir={out}",
        nproc=2,
    )
    source = torch.load(imagenet_file, weights_only=True)
    final = torch.load(out / "model.pt", weights_only=True)
    for key, tensor in final.items():
        if key.split(".")[0] not in ("conv1", "fc"):
            assert torch.equal(tensor, source[key]), f"{key} moved in a frozen run"
    assert final["conv1.weight"].shape == (64, 1, 7, 7)
    assert len(read_history(out)) == 1
