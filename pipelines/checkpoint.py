"""Checkpoint directories: the method's state_dict, the optimiser and step, and what built them.

<dir>/model.pt        state_dict of the (unwrapped) method — everything a method is
<dir>/train_state.pt  {"optimizer": ..., "step": int, "epoch": int, "epoch_step": int}
<dir>/meta.json       {"method": {...}, "backbone": {...}, "image_size": int, "epoch", "step",
                       "epoch_step"}
`step` counts optimiser steps from the start of the run. A checkpoint taken at the end of an epoch
has `epoch` = that epoch and `epoch_step` = 0; one taken inside an epoch (by time, by step count,
or on a stop) has `epoch` = the epoch in progress and `epoch_step` = its steps already done.
Checkpoints written before `epoch_step` existed were all taken at an epoch's end.
Loading uses `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import NamedTuple

import torch
from torch import nn

import methods
from methods.backbones import BackboneConfig
from methods.config import build
from pipelines.train_loop import unwrap

MODEL, TRAIN_STATE, META = "model.pt", "train_state.pt", "meta.json"


class ResumePoint(NamedTuple):
    """Where training goes on from: global step, epoch to run, steps of it already done."""
    step: int
    epoch: int
    epoch_step: int


def resume_point(meta: dict) -> ResumePoint:
    """The point after a checkpoint with this meta (or train state)."""
    if meta.get("epoch_step"):
        return ResumePoint(int(meta["step"]), int(meta["epoch"]), int(meta["epoch_step"]))
    return ResumePoint(int(meta["step"]), int(meta["epoch"]) + 1, 0)


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int,
         epoch: int, build_info: dict, epoch_step: int = 0) -> None:
    """Write a checkpoint directory; `build_info` = {"method", "backbone", "image_size"};
    `epoch_step` > 0 marks a checkpoint inside epoch `epoch`, after that many of its steps."""
    os.makedirs(path, exist_ok=True)
    torch.save(unwrap(model).state_dict(), os.path.join(path, MODEL))
    at = {"step": step, "epoch": epoch, "epoch_step": epoch_step}
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), **at}, os.path.join(path, TRAIN_STATE))
    with open(os.path.join(path, META), "w") as f:
        json.dump({**build_info, **at}, f, indent=2)


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path} is not a selfsup checkpoint (no {META})")
    with open(meta_path) as f:
        return json.load(f)


def build_model(info: dict) -> nn.Module:
    """A fresh method module from `build_info` (method config dict with its name, backbone, size)."""
    method = dict(info["method"])
    spec = methods.get(method.pop("name"))
    return spec.model(build(spec.config, method, "method"), build(BackboneConfig, info["backbone"],
                                                                   "backbone"), info["image_size"])


def load_model(path: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The method stored at `path`, in eval mode, and its meta."""
    meta = read_meta(path)
    model = build_model(meta)
    state = torch.load(os.path.join(path, MODEL), map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def load_train_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     map_location: str | torch.device = "cpu") -> ResumePoint:
    """Restore model and optimiser in place; return where training goes on from."""
    state = torch.load(os.path.join(path, MODEL), map_location=map_location, weights_only=True)
    unwrap(model).load_state_dict(state)
    train = torch.load(os.path.join(path, TRAIN_STATE), map_location=map_location,
                       weights_only=True)
    optimizer.load_state_dict(train["optimizer"])
    return resume_point(train)


def step_of(path: str) -> int | None:
    """The step in a checkpoint's meta.json, or None when it cannot be read (an upload or a disk
    that filled up half way): such a checkpoint is passed over, never a reason to fail."""
    try:
        return int(read_meta(path)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_checkpoints(run_dir: str, *, resumable: bool) -> list[str]:
    """The complete checkpoint directories under `<run_dir>/checkpoints`, newest (highest step)
    first. Complete: model and readable meta, and with `resumable` the optimiser state too (what
    a restart needs; `selfsup eval` and the baseline's random-init checkpoint need no more)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    needed = (MODEL, META, TRAIN_STATE) if resumable else (MODEL, META)
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("checkpoint_") and all(os.path.exists(os.path.join(path, f))
                                                  for f in needed):
            step = step_of(path)
            if step is None:
                warnings.warn(f"skipping checkpoint {path}: its {META} cannot be read")
            else:
                found.append((step, path))
    return [path for _, path in sorted(found, reverse=True)]
