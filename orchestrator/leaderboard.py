"""Leaderboard rows from run folders: one row per run, its method, key hyperparameters, every
stage's scalar metrics (`<stage>/<metric>`) and wall time. A sweep folder is searched for runs."""
from __future__ import annotations

import csv
import json
import os

import yaml

import methods
from methods.config import tunables

TRAIN_KEYS = ("backbone.name", "train.epochs", "train.batch_size", "train.lr")
FIRST = ("run", "method")
RANK_BY = ("linear/top1", "knn/top1", "finetune/top1")
# The columns the HTML table shows per stage (the CSV has every metric); other stages show all.
HEADLINE = {"knn": ("top1",), "linear": ("top1",), "finetune": ("top1",),
            "lowshot": ("linear_1pct", "linear_10pct", "finetune_1pct", "finetune_10pct"),
            "cluster": ("nmi", "ari"), "robustness": ("clean_top1", "corrupt_top1", "mean_drop"),
            "efficiency": ("params", "train_images_per_s", "inference_images_per_s", "peak_rss_mb"),
            "tsne": (), "embed": ()}


def find_runs(path: str, depth: int = 3) -> list[str]:
    """`path` itself when it holds summary.json, else the run folders below it (sorted)."""
    if os.path.exists(os.path.join(path, "summary.json")):
        return [path]
    if depth == 0 or not os.path.isdir(path):
        return []
    return [run for child in sorted(os.listdir(path))
            if os.path.isdir(os.path.join(path, child)) and child not in ("stages", "checkpoints")
            for run in find_runs(os.path.join(path, child), depth - 1)]


def _dotted(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def hyperparameters(config: dict) -> dict:
    """The method's tunable hyperparameters and the main training settings, as dotted keys."""
    name = (config.get("method") or {}).get("name")
    keys = [f"method.{k}" for k in tunables(methods.get(name).config)] \
        if name in methods.METHODS else []
    out = {}
    for key in keys + list(TRAIN_KEYS):
        value = _dotted(config, key)
        if value is not None:
            out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def run_row(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    config = {}
    if os.path.exists(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            config = yaml.safe_load(f) or {}
    row = {"run": summary.get("run", os.path.basename(run_dir)),
           "method": summary.get("method", (config.get("method") or {}).get("name", "")),
           **hyperparameters(config)}
    for stage, metrics in summary.get("eval", {}).items():
        row.update({f"{stage}/{k}": v for k, v in metrics.items() if k != "seconds"
                    and isinstance(v, (int, float)) and not isinstance(v, bool)})
    wall = summary.get("train", {}).get("wall_s")
    row["wall_s"] = wall if isinstance(wall, (int, float)) else None
    return row


def _rank(row: dict) -> tuple:
    for key in RANK_BY:
        if isinstance(row.get(key), (int, float)):
            return (0, -row[key])
    return (1, 0)


def leaderboard_rows(run_dirs: list[str]) -> tuple[list[dict], list[str]]:
    """(rows best first, columns: run, method, hyperparameters, metrics, wall_s)."""
    rows = sorted((run_row(d) for d in run_dirs), key=_rank)
    seen = {c: None for r in rows for c in r}
    params = [c for c in seen if c.startswith(("method.", "backbone.", "train."))]
    metrics = sorted(c for c in seen if "/" in c)
    return rows, [*FIRST, *params, *metrics, "wall_s"]


def headline_columns(columns: list[str]) -> list[str]:
    """`columns` without the per-stage detail the HTML leaves to the CSV."""
    def shown(c: str) -> bool:
        stage, _, metric = c.partition("/")
        return not metric or stage not in HEADLINE or metric in HEADLINE[stage]
    return [c for c in columns if shown(c)]


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
