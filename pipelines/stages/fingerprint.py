"""Fingerprints of a stage's inputs, so a re-run skips the stages whose inputs did not change.

A stage's fingerprint digests the checkpoint it evaluates (content and step), its own config
sections, the labeled split keys, the seed, and the fingerprints of the stages it requires, so a
change anywhere upstream reaches everything downstream. It is stored beside the stage's
metrics.json, and written last: a stage interrupted half way is never taken as done.
"""
from __future__ import annotations

import hashlib
import json
import os


FINGERPRINT, METRICS = "fingerprint.json", "metrics.json"


def digest(value) -> str:
    """sha1 of a JSON-able value, independent of dict order."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def checkpoint_digest(path: str) -> dict:
    """{"model_sha1", "step"} of a checkpoint directory: retraining to a new state changes it."""
    from pipelines.checkpoint import MODEL, read_meta
    h = hashlib.sha1()
    with open(os.path.join(path, MODEL), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"model_sha1": h.hexdigest(), "step": read_meta(path).get("step")}


def stored_metrics(stage_dir: str, fingerprint: str) -> dict | None:
    """The stored metrics when the stage last ran with this fingerprint, else None."""
    try:
        with open(os.path.join(stage_dir, FINGERPRINT)) as f:
            if json.load(f).get("fingerprint") != fingerprint:
                return None
        with open(os.path.join(stage_dir, METRICS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def forget(stage_dir: str) -> None:
    """Drop the stored fingerprint before a stage runs again."""
    path = os.path.join(stage_dir, FINGERPRINT)
    if os.path.exists(path):
        os.remove(path)


def save(stage_dir: str, metrics: dict, fingerprint: str, inputs: dict) -> None:
    with open(os.path.join(stage_dir, METRICS), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    with open(os.path.join(stage_dir, FINGERPRINT), "w") as f:
        json.dump({"fingerprint": fingerprint, "inputs": inputs}, f, indent=2, default=str)
