import copy
import itertools
import json

import pytest
import torch
import torchvision
from torch import nn

from fmdist import models
from fmdist.config import load_config
from fmdist.regimes import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    adapt_stem_and_head,
    build_model,
    grey_stem_filters,
)

from helpers import CONFIGS, TINY_SYNTHETIC_RUN, train


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_output(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)()
    ours = getattr(models, arch)()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    reference.eval(), ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)


def test_block_types_match_the_tutorial_names():
    assert isinstance(models.resnet18().layer1[0], models.BasicBlock)
    assert isinstance(models.resnet50().layer1[0], models.BottleNeck)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_task_shaped_model_takes_grey_28x28_and_gives_10_logits(arch):
    model = models.resnet(arch, in_channels=1, num_classes=10).eval()
    assert model.conv1.weight.shape[1] == 1
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def imagenet_like_resnet18() -> models.ResNet:
    """torchvision-shaped weights with BatchNorm statistics that are not the identity, as trained ones."""
    torch.manual_seed(0)
    model = models.resnet18()
    model.load_state_dict(torchvision.models.resnet18().state_dict())
    model.bn1.running_mean.normal_()
    model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("normalization", [(0.449, 0.226), (0.2860, 0.3530)])
def test_rgb_sum_stem_sees_a_grey_image_as_the_pretrained_stem_sees_it_in_colour(normalization):
    """Grey x normalised with the run's statistics through the new stem and bn1 equals (x, x, x)
    normalised with ImageNet's per-channel statistics through the pretrained ones, for any choice
    of the run's statistics (except on the 3-pixel border, where the zero padding means other pixels)."""
    pretrained = imagenet_like_resnet18()
    original = copy.deepcopy(pretrained)
    adapt_stem_and_head(pretrained, 1, 10, "rgb_sum", "imagenet", normalization)
    pretrained.eval()
    x = torch.rand(2, 1, 28, 28)
    colour = (x.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    mean, std = normalization
    with torch.no_grad():
        expected = original.bn1(original.conv1(colour))
        actual = pretrained.bn1(pretrained.conv1((x - mean) / std))
    torch.testing.assert_close(actual[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], rtol=0, atol=1e-5)
    assert not torch.allclose(actual, expected, atol=1e-5)  # the border: only the interior can match
    assert pretrained.fc.out_features == 10


def test_rgb_sum_stem_for_three_grey_channels_matches_the_one_channel_stem():
    one, three = imagenet_like_resnet18(), imagenet_like_resnet18()
    adapt_stem_and_head(one, 1, 10, "rgb_sum", "imagenet", (0.449, 0.226))
    adapt_stem_and_head(three, 3, 10, "rgb_sum", "imagenet", (0.449, 0.226))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(three.conv1(x.expand(-1, 3, -1, -1)), one.conv1(x))


def test_rgb_sum_of_one_channel_weights_in_fashion_mnist_normalisation_is_the_identity():
    torch.manual_seed(0)
    grey = models.resnet18(in_channels=1, num_classes=10)
    before, statistics = grey.conv1.weight.detach().clone(), grey.bn1.running_mean.clone()
    adapt_stem_and_head(grey, 1, 10, "rgb_sum", "imagenet", (FASHION_MNIST_MEAN, FASHION_MNIST_STD))
    torch.testing.assert_close(grey.conv1.weight.detach(), before)
    torch.testing.assert_close(grey.bn1.running_mean, statistics)


def test_cifar_stem_keeps_28x28_for_the_first_block_and_costs_about_14_times_more():
    imagenet, cifar = (models.resnet18(in_channels=1, num_classes=10, stem=stem) for stem in ("imagenet", "cifar"))
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity) and isinstance(imagenet.maxpool, nn.MaxPool2d)
    sizes = {}

    def record_size(name):
        def hook(_module, _inputs, output):
            sizes[name] = output.shape[-1]

        return hook

    for name, model in (("imagenet", imagenet), ("cifar", cifar)):
        model.layer1.register_forward_hook(record_size(name))
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert sizes == {"imagenet": 7, "cifar": 28}
    assert list(cifar.state_dict()) == list(imagenet.state_dict())  # same names: checkpoints stay compatible
    ratio = models.forward_gflops(cifar, 1, 28) / models.forward_gflops(imagenet, 1, 28)
    assert 12 < ratio < 16, ratio


def test_forward_gflops_counts_resnet18_at_224_as_published_and_grows_with_the_image_area():
    rgb = models.resnet18()
    assert models.forward_gflops(rgb, 3, 224) == pytest.approx(2 * 1.814, rel=0.01)  # 1.81 GMACs (torchvision)
    grey = models.resnet18(in_channels=1, num_classes=10)
    costs = [models.forward_gflops(grey, 1, size) for size in (28, 56, 112, 224)]
    assert all(b / a == pytest.approx(4, rel=0.25) for a, b in itertools.pairwise(costs))
    assert all(p.device.type == "cpu" for p in grey.parameters())  # counted on a shape-only copy


def test_a_run_states_its_forward_cost_at_its_image_size_in_its_log_and_summary(tmp_path):
    out = tmp_path / "run56"
    overrides = [*TINY_SYNTHETIC_RUN, "data.image_size=56"]
    printed = train(tmp_path, "--config", str(CONFIGS / "smoke.yaml"), *overrides, f"output_dir={out}").stdout
    model, _ = build_model(load_config(CONFIGS / "smoke.yaml", overrides))
    gflops = models.forward_gflops(model, 1, 56)
    assert f"fmdist: imagenet stem, 56x56 input: {gflops:.3f} GFLOPs per image forward" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["forward_gflops_per_image"] == pytest.approx(gflops)
    at_28 = models.forward_gflops(model, 1, 28)
    assert summary["forward_gflops_per_image"] == pytest.approx(4 * at_28, rel=0.1)  # 4x the pixels, ~4x the work


def test_cifar_stem_from_pretrained_filters_keeps_each_filter_sum():
    pretrained = imagenet_like_resnet18()
    summed, _ = grey_stem_filters(pretrained.conv1.weight.detach(), 0.449, 0.226)
    adapt_stem_and_head(pretrained, 1, 10, "rgb_sum", "cifar", (0.449, 0.226))
    assert pretrained.conv1.weight.shape == (64, 1, 3, 3) and isinstance(pretrained.maxpool, nn.Identity)
    torch.testing.assert_close(pretrained.conv1.weight.detach().sum(dim=(1, 2, 3)), summed.sum(dim=(1, 2, 3)))
    assert pretrained.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_random_stem_is_newly_initialised_and_leaves_the_pretrained_bn1_alone():
    source = imagenet_like_resnet18()
    running_mean = source.bn1.running_mean.clone()
    from_filters, random = copy.deepcopy(source), copy.deepcopy(source)
    adapt_stem_and_head(from_filters, 1, 10, "rgb_sum", "imagenet", (0.449, 0.226))
    torch.manual_seed(1)
    adapt_stem_and_head(random, 1, 10, "random", "imagenet", (0.449, 0.226))
    torch.manual_seed(1)
    expected = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    models.init_conv(expected)

    assert random.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.equal(random.conv1.weight, expected.weight)  # kaiming initialisation, nothing of the source
    assert not torch.allclose(random.conv1.weight, from_filters.conv1.weight, atol=1e-3)
    assert torch.equal(random.bn1.running_mean, running_mean)  # no offset folded in for random filters
    assert not torch.equal(from_filters.bn1.running_mean, running_mean)
    assert torch.equal(random.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
