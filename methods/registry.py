"""The method registry: one entry per SSL method, keyed by its lower-case name.

A method file registers itself with `register(...)` at import time; `methods/__init__.py` imports
every method file, so `METHODS` is complete once `methods` is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from methods.config import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of selfsup needs to know about a method.

    config: the method's dataclass (paper defaults, ranges, tunable flags).
    model:  `model(cfg, backbone_cfg, image_size)` -> nn.Module with `forward(batch) -> (loss,
            metrics)`, `on_step(step, total_steps)` and `embed(images) -> (B, D)`.
    views:  `views(cfg, image_size)` -> picklable callable `(images uint8 (B, 3, H, W),
            generator) -> dict of batch-aligned tensors`; Ray Data runs it in CPU tasks.
    paper:  authors, year and arXiv id.
    """
    name: str
    config: type
    model: Callable
    views: Callable
    paper: str


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, config: type, model: Callable, views: Callable, paper: str) -> MethodSpec:
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = MethodSpec(name, config, model, views, paper)
    return METHODS[name]


def get(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown method {name!r}; "
                          f"registered methods: {', '.join(sorted(METHODS))}") from None
