"""The three regimes: what trains, and a frozen backbone that really stays frozen."""

import pytest
import torch
import torchvision
from torch import nn

from fmdist import distributed
from fmdist.config import load_config
from fmdist.data import load_splits, train_loader
from fmdist.engine import EpochProgress, train_one_epoch
from fmdist.errors import FmdistError
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


def state_around_one_epoch(cfg, model) -> tuple[dict, dict]:
    """The model's state before and after one in-process training epoch of cfg."""
    runtime = distributed.setup(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(cfg.optimizer, model)
    model, optimizer = runtime.accelerator.prepare(model, optimizer)
    train_split, _ = load_splits(cfg.data, cfg.model.num_classes)
    transform = BatchTransform.from_config(cfg, rank=0, device=runtime.device)
    loader = train_loader(train_split, 32, 0, cfg.data, runtime.device)
    train_one_epoch(model, loader, optimizer, transform, runtime.accelerator, 1, EpochProgress(), lambda: False)
    return before, runtime.accelerator.unwrap_model(model).state_dict()


def test_frozen_epoch_changes_conv1_and_fc_only_and_no_batchnorm_statistics(imagenet_file, fresh_accelerate):
    cfg = regime_cfg("frozen", imagenet_file, **{"model.stem_init": "rgb_sum"})
    model, counts = build_model(cfg)
    before, after = state_around_one_epoch(cfg, model)
    trainable = {k for k in after if k.split(".")[0] in ("conv1", "fc")}
    assert trainable == {"conv1.weight", "fc.weight", "fc.bias"}
    for key in after:
        if key in trainable:
            assert not torch.equal(after[key], before[key]), f"{key} should have trained"
        else:
            assert torch.equal(after[key], before[key]), f"{key} is frozen but changed"
    assert counts.trainable == 64 * 7 * 7 + 512 * 10 + 10
    assert counts.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("regime", ["pretrained", "frozen"])
def test_stem_init_from_the_config_builds_conv1_from_the_weights_or_at_random(imagenet_file, regime):
    source = torchvision.models.resnet18()
    source.load_state_dict(torch.load(imagenet_file, weights_only=True))
    configs = {
        stem_init: regime_cfg(regime, imagenet_file, **{"model.stem_init": stem_init})
        for stem_init in ("rgb_sum", "random")
    }
    built = {stem_init: build_model(cfg)[0] for stem_init, cfg in configs.items()}
    grey = torch.rand(2, 1, 28, 28)
    mean, std = configs["rgb_sum"].data.mean, configs["rgb_sum"].data.std  # resolved from the weights
    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    colour = (grey.expand(-1, 3, -1, -1) - torch.tensor(imagenet_mean).view(1, 3, 1, 1)) / torch.tensor(
        imagenet_std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source.eval().bn1(source.conv1(colour))
        from_filters = built["rgb_sum"].eval().bn1(built["rgb_sum"].conv1((grey - mean) / std))
        at_random = built["random"].eval().bn1(built["random"].conv1((grey - mean) / std))
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the zero-padded border
    torch.testing.assert_close(from_filters[inner], expected[inner], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(at_random[inner], expected[inner], atol=0.1)
    assert torch.equal(built["random"].bn1.running_mean, source.bn1.running_mean)
    assert torch.equal(built["random"].layer1[0].conv1.weight, source.layer1[0].conv1.weight)


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
    initial, _ = build_model(load_config(out / "config.yaml"))
    source = torch.load(imagenet_file, weights_only=True)
    final = torch.load(out / "model.pt", weights_only=True)
    for key, tensor in final.items():
        if key.split(".")[0] not in ("conv1", "fc"):
            assert torch.equal(tensor, initial.state_dict()[key]), f"{key} moved in a frozen run"
            if key != "bn1.running_mean":  # where rgb_sum folds the normalisation (test_models)
                assert torch.equal(tensor, source[key]), f"{key} is not the pretrained weight"
    assert final["conv1.weight"].shape == (64, 1, 7, 7)
    assert len(read_history(out)) == 1


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_partial_trains_layer4_besides_conv1_and_fc_and_one_epoch_moves_nothing_else(imagenet_file, fresh_accelerate):
    cfg = regime_cfg("partial", imagenet_file)
    assert cfg.model.unfreeze == ["layer4"]
    model, counts = build_model(cfg)
    layer4 = {f"layer4.{name}" for name, _ in model.layer4.named_parameters()}
    assert trainable_names(model) == {"conv1.weight", "fc.weight", "fc.bias"} | layer4
    assert counts.trainable == sum(p.numel() for p in model.layer4.parameters()) + 64 * 7 * 7 + 512 * 10 + 10
    before, after = state_around_one_epoch(cfg, model)
    moved = {key for key in after if not torch.equal(after[key], before[key])}
    assert {"conv1.weight", "fc.weight", "layer4.1.bn2.running_mean", "layer4.0.conv1.weight"} <= moved
    assert all(key.split(".")[0] in ("conv1", "fc", "layer4") for key in moved), moved


def test_partial_with_bn_trains_every_batchnorm_affine_parameter_with_batch_statistics(imagenet_file):
    model, counts = build_model(regime_cfg("partial", imagenet_file, **{"model.unfreeze": "bn"}))
    batchnorms = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {f"{bn}.{p}" for bn in batchnorms for p in ("weight", "bias")} | {"conv1.weight", "fc.weight", "fc.bias"}
    assert trainable_names(model) == expected
    model.train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_partial_unfreezes_blocks_by_dotted_name(imagenet_file):
    model, _ = build_model(regime_cfg("partial", imagenet_file, **{"model.unfreeze": "layer4.1,layer3.1.bn2"}))
    names = trainable_names(model)
    assert "layer4.1.conv2.weight" in names and "layer3.1.bn2.weight" in names
    assert "layer4.0.conv1.weight" not in names and "layer3.1.conv2.weight" not in names
    model.train()
    assert model.layer3[1].bn2.training and not model.layer3[1].bn1.training


def test_unfreeze_names_a_block_the_architecture_lacks(imagenet_file):
    with pytest.raises(FmdistError, match=r"model.unfreeze: ResNet has no module 'layer4.2'"):
        build_model(regime_cfg("partial", imagenet_file, **{"model.unfreeze": "layer4.2"}))
    with pytest.raises(FmdistError, match=r"command line: key 'model.unfreeze': expected names among bn"):
        regime_cfg("partial", imagenet_file, **{"model.unfreeze": "layer5"})


def test_pretrained_with_the_cifar_stem_keeps_the_pretrained_backbone(imagenet_file):
    source = torch.load(imagenet_file, weights_only=True)
    model, _ = build_model(regime_cfg("pretrained", imagenet_file, **{"model.stem": "cifar"}))
    assert model.conv1.weight.shape == (64, 1, 3, 3) and isinstance(model.maxpool, nn.Identity)
    assert torch.equal(model.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_cifar_stem_run_can_start_a_pretrained_one(tmp_path, imagenet_file):
    """Weights saved by a cifar-stem run (e.g. compare's stand-in) are read back in their own shape."""
    scratch, _ = build_model(regime_cfg("scratch", imagenet_file, **{"model.stem": "cifar"}))
    path = tmp_path / "cifar.pth"
    torch.save(scratch.state_dict(), path)
    model, _ = build_model(regime_cfg("frozen", path, **{"model.stem": "cifar"}))
    torch.testing.assert_close(model.conv1.weight, scratch.conv1.weight)  # 1 channel, same statistics
    assert torch.equal(model.layer3[0].conv2.weight, scratch.layer3[0].conv2.weight)
    imagenet_stem, _ = build_model(regime_cfg("frozen", path, **{"model.stem": "imagenet"}))
    assert imagenet_stem.conv1.weight.shape == (64, 1, 7, 7) and isinstance(imagenet_stem.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize(
    ("regime", "weights", "expected"),
    [
        ("scratch", "IMAGENET1K_V1", (0.2860, 0.3530)),
        ("pretrained", "IMAGENET1K_V1", (0.449, 0.226)),
        ("frozen", "DEFAULT", (0.449, 0.226)),
        ("partial", "IMAGENET1K_V1", (0.449, 0.226)),
        ("pretrained", "runs/scratch/model.pt", (0.2860, 0.3530)),
    ],
)
def test_input_normalisation_follows_the_starting_weights_unless_set(regime, weights, expected):
    cfg = load_config(None, [f"regime={regime}", f"model.weights={weights}"])
    assert (cfg.data.mean, cfg.data.std) == expected
    cfg = load_config(None, [f"regime={regime}", f"model.weights={weights}", "data.mean=0.5", "data.std=0.25"])
    assert (cfg.data.mean, cfg.data.std) == (0.5, 0.25)
