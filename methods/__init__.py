"""Self-supervised methods as plain PyTorch modules; importing the package registers them all."""
from methods import backbones, simclr  # noqa: F401  (registration side effects)
from methods.registry import METHODS, MethodSpec, get

__all__ = ["METHODS", "MethodSpec", "get"]
