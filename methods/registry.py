"""The method registry: one entry per SSL method, keyed by its lower-case name.

A method file registers itself with `register(...)` at import time; `methods.load_all()` imports
every method file (the first use of `methods.METHODS` or `methods.get` calls it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from methods.config import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of selfsup knows about a method; its file is the only place it is said.

    config: the method's dataclass (paper defaults, ranges, tunable flags).
    model:  the `SSLMethod` subclass, built as `model(cfg, backbone_cfg, image_size)`; its hooks
            (methods/base.py) are all generic code may call.
    views:  `views(cfg, image_size)` -> picklable callable `(images uint8 (B, 3, H, W),
            generator) -> dict of batch-aligned tensors`; Ray Data runs it in CPU tasks.
    paper:  authors, year and arXiv id.
    tiny:   the smallest config that still runs the method's real code, for the contract tests:
            {"method": overrides, "backbone": overrides, "image_size": int}.
    """
    name: str
    config: type
    model: type
    views: Callable
    paper: str
    tiny: dict = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, config: type, model: type, views: Callable, paper: str,
             tiny: dict) -> MethodSpec:
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    unknown = set(tiny) - {"method", "backbone", "image_size"}
    if unknown:
        raise ValueError(f"method {name!r}: tiny has unknown keys {sorted(unknown)}")
    METHODS[name] = MethodSpec(name, config, model, views, paper, dict(tiny))
    return METHODS[name]


def get(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown method {name!r}; "
                          f"registered methods: {', '.join(sorted(METHODS))}") from None
