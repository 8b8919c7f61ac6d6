"""Self-supervised methods as plain PyTorch modules, registered by name.

Importing the package is cheap: `METHODS`, `get` and `MethodSpec` import every method module (and
so torch) on first use. Code that needs only `methods.config`, such as the Ray tasks that list and
decode images or the CLI's help, never pays for torch.
"""
from __future__ import annotations

_loaded = False


def load_all() -> None:
    """Import every method and backbone module once (each registers itself)."""
    global _loaded
    if _loaded:
        return
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
    from methods import byol  # noqa: F401
    _loaded = True


def __getattr__(name: str):
    if name in ("METHODS", "MethodSpec", "get"):
        load_all()
        from methods import registry
        globals()[name] = value = getattr(registry, name)
        return value
    raise AttributeError(f"module 'methods' has no attribute {name!r}")


__all__ = ["METHODS", "MethodSpec", "get", "load_all"]
