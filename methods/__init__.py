"""Self-supervised methods as plain PyTorch modules; importing the package registers them all."""
# One import line per method or backbone module (registration side effects).
from methods import backbones  # noqa: F401
from methods import simclr  # noqa: F401
from methods.registry import METHODS, MethodSpec, get  # noqa: E402

__all__ = ["METHODS", "MethodSpec", "get"]
