"""Pretrained weights through torch.hub's cache and from local files, offline, with every defect reported."""

from pathlib import Path

import pytest
import torch
import torchvision

from fmdist import models, weights
from fmdist.config import load_config
from fmdist.errors import FmdistError
from fmdist.regimes import build_model

from helpers import OFFLINE_ENV

RESNET18_V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
RESNET18_FILE = RESNET18_V1.url.rsplit("/", 1)[-1]  # resnet18-f37072fd.pth


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    return home


def pretrained_cfg(**overrides):
    items = [f"{k}={v}" for k, v in {"regime": "pretrained", "data.source": "synthetic", **overrides}.items()]
    return load_config(None, items)


def imagenet_shaped_state(arch="resnet18", seed=0, **kwargs):
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(**kwargs).state_dict()


def test_named_weights_are_read_from_the_torch_home_hub_cache(torch_home):
    state = imagenet_shaped_state()
    cached = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)

    model, counts = build_model(pretrained_cfg(**{"model.weights": "IMAGENET1K_V1"}))

    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(model.layer1[0].bn1.running_mean, state["layer1.0.bn1.running_mean"])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])  # (its mean absorbs the normalisation)
    assert model.conv1.weight.shape == (64, 1, 7, 7) and model.fc.weight.shape == (10, 512)
    assert counts.trainable == counts.total


def test_download_uses_the_published_url_and_hash_and_lands_in_the_cache(torch_home, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # stands in for the internet only
        calls.append((url, Path(dst), hash_prefix))
        torch.save(imagenet_shaped_state(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = weights.fetch_weights_file("IMAGENET1K_V1", "resnet18")
    assert calls == [(RESNET18_V1.url, torch_home / "hub" / "checkpoints" / RESNET18_FILE, "f37072fd")]
    assert path == calls[0][1] and path.is_file()
    weights.fetch_weights_file("IMAGENET1K_V1", "resnet18")
    assert len(calls) == 1, "a cached file must not be downloaded again"


def test_offline_with_nothing_cached_names_the_file_and_the_folder(torch_home):
    with pytest.raises(FmdistError) as error:
        build_model(pretrained_cfg(**{"model.weights": "IMAGENET1K_V1"}))
    message = str(error.value)
    assert RESNET18_FILE in message and str(torch_home / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_unknown_weights_name_lists_the_known_ones():
    with pytest.raises(FmdistError, match="no resnet18 weights named 'IMAGENET9K'.*IMAGENET1K_V1"):
        weights.fetch_weights_file("IMAGENET9K", "resnet18")


def test_local_imagenet_shaped_file_is_adapted(tmp_path):
    state = imagenet_shaped_state("resnet50")
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    model, _ = build_model(pretrained_cfg(**{"model.arch": "resnet50", "model.weights": str(path)}))
    assert torch.equal(model.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert model.fc.weight.shape == (10, 2048)


def test_local_file_of_task_shape_and_wrapped_state_dict_load(tmp_path):
    source = models.resnet18(in_channels=1, num_classes=10, width=16)
    path = tmp_path / "task.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model, _ = build_model(pretrained_cfg(**{"model.weights": str(path), "model.width": 16}))
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


class NotATensor:
    pass


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: torch.save({"conv1.weight": NotATensor()}, p), r"refused by torch.load\(weights_only=True\)"),
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "not a readable PyTorch weights file"),
        (lambda p: torch.save([torch.zeros(1)], p), "expected a state dict"),
        (lambda p: torch.save(imagenet_shaped_state("resnet34"), p), "keys do not match resnet18.*missing|unexpected"),
        (
            lambda p: torch.save(models.resnet18(width=32).state_dict(), p),
            r"'conv1.weight' has shape \[32, 3, 7, 7\], resnet18 \(width 64\) expects \[64, 3, 7, 7\]",
        ),
    ],
    ids=["pickle-with-objects", "corrupt", "not-a-state-dict", "wrong-keys", "wrong-shapes"],
)
def test_bad_weights_files_give_one_line_naming_the_file(tmp_path, write, expected):
    path = tmp_path / "bad.pth"
    write(path)
    with pytest.raises(FmdistError, match=expected) as error:
        build_model(pretrained_cfg(**{"model.weights": str(path)}))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_local_file(tmp_path):
    with pytest.raises(FmdistError, match="model.weights: .*nope.pth: file not found"):
        build_model(pretrained_cfg(**{"model.weights": str(tmp_path / "nope.pth")}))


def test_init_from_loads_exact_weights_and_rejects_another_shape(tmp_path):
    source = models.resnet18(in_channels=1, num_classes=10, width=8)
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    cfg = load_config(None, ["model.width=8", f"model.init_from={path}"])
    model, _ = build_model(cfg)
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor)
    with pytest.raises(FmdistError, match="has shape"):
        build_model(load_config(None, ["model.width=16", f"model.init_from={path}"]))
