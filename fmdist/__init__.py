"""fmdist: distributed ResNet training on FashionMNIST, comparing pretrained, scratch and frozen regimes."""

__version__ = "0.1.0"
