"""bigtrain: a PyTorch-native large-scale trainer."""

__version__ = "0.1.0"
