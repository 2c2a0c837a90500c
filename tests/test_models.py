import pytest
import torch
import torchvision

from fmdist import models
from fmdist.regimes import adapt_stem_and_head


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


def test_rgb_sum_stem_sees_a_grey_image_as_the_pretrained_stem_sees_it_in_colour():
    torch.manual_seed(0)
    pretrained = models.resnet18()
    rgb_conv = pretrained.conv1
    adapt_stem_and_head(pretrained, in_channels=1, num_classes=10, stem_init="rgb_sum")
    grey = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(pretrained.conv1(grey), rgb_conv(grey.expand(-1, 3, -1, -1)))
    assert pretrained.fc.out_features == 10


def test_random_stem_is_newly_initialised():
    torch.manual_seed(0)
    pretrained = models.resnet18()
    summed = pretrained.conv1.weight.detach().sum(1, keepdim=True)
    adapt_stem_and_head(pretrained, in_channels=1, num_classes=10, stem_init="random")
    assert pretrained.conv1.weight.shape == (64, 1, 7, 7)
    assert not torch.equal(pretrained.conv1.weight.detach(), summed)
