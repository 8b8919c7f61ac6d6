"""Self-supervised methods as plain PyTorch modules; importing the package registers them all."""
# One import line per method or backbone module (registration side effects).
from methods import backbones  # noqa: F401
from methods import simclr  # noqa: F401
from methods import rotnet  # noqa: F401
from methods import relative_loc  # noqa: F401
from methods import jigsaw  # noqa: F401
from methods import inpainting  # noqa: F401
from methods import colorization  # noqa: F401
from methods import split_brain  # noqa: F401
from methods import vit  # noqa: F401
from methods import moco  # noqa: F401
from methods import moco_v3  # noqa: F401
from methods import cpc  # noqa: F401
from methods import dino  # noqa: F401
from methods import mae  # noqa: F401
from methods.registry import METHODS, MethodSpec, get  # noqa: E402

__all__ = ["METHODS", "MethodSpec", "get"]
