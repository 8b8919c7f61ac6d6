"""Checkpoint directories: the method's state_dict, the optimiser and step, and what built them.

<dir>/model.pt        state_dict of the (unwrapped) method — everything a method is
<dir>/train_state.pt  {"optimizer": ..., "step": int, "epoch": int}
<dir>/meta.json       {"method": {...}, "backbone": {...}, "image_size": int, "epoch", "step"}
Loading uses `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

import methods
from methods.backbones import BackboneConfig
from methods.config import build
from pipelines.train_loop import unwrap

MODEL, TRAIN_STATE, META = "model.pt", "train_state.pt", "meta.json"


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, step: int,
         epoch: int, build_info: dict) -> None:
    """Write a checkpoint directory; `build_info` = {"method", "backbone", "image_size"}."""
    os.makedirs(path, exist_ok=True)
    torch.save(unwrap(model).state_dict(), os.path.join(path, MODEL))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch},
                   os.path.join(path, TRAIN_STATE))
    with open(os.path.join(path, META), "w") as f:
        json.dump({**build_info, "step": step, "epoch": epoch}, f, indent=2)


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
                     map_location: str | torch.device = "cpu") -> tuple[int, int]:
    """Restore model and optimiser in place; return (step, epoch) of the checkpoint."""
    state = torch.load(os.path.join(path, MODEL), map_location=map_location, weights_only=True)
    unwrap(model).load_state_dict(state)
    train = torch.load(os.path.join(path, TRAIN_STATE), map_location=map_location,
                       weights_only=True)
    optimizer.load_state_dict(train["optimizer"])
    return int(train["step"]), int(train["epoch"])
