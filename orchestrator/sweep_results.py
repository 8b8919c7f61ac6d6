"""A sweep's results: each trial's status, the leaderboard, best.json and side-by-side TensorBoard.

Trials are ranked on the online kNN top-1 (Wu et al., 2018, arXiv:1805.01978), never the loss,
which is not comparable across temperatures, queue sizes or masking ratios. A trial is
`collapsed` when its normalised embeddings lost their spread (SimSiam's per-dimension std, Chen &
He, 2021, arXiv:2011.10566: `embed_std_ratio` ~1 healthy, ~0 collapsed), its kNN is at chance, or
its method's own `collapse` hook says so from the method's epoch metrics (DINO: a uniform teacher,
which the embedding checks can miss since the backbone's features keep their spread).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass

import methods
from orchestrator.tracking import read_records
from orchestrator.train import latest_checkpoint

METRIC = "knn_top1"  # Tune's result key
ONLINE, SPREAD = "online/knn_top1", "online/embed_std_ratio"  # their leaderboard columns
METHOD_PREFIX = "method/"  # Tune's keys of the method's own epoch metrics


def _number(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def method_metrics(result: dict) -> dict[str, float]:
    """The method's own epoch metrics in a Tune result, by their names in `forward`."""
    return {k[len(METHOD_PREFIX):]: float(v) for k, v in result.items()
            if k.startswith(METHOD_PREFIX) and _number(v) is not None}


@dataclass(frozen=True)
class CollapseRule:
    """When a trial counts as collapsed: embedding spread below `std_ratio`, kNN top-1 at or
    below `chance_top1` (None: not checked), or the method's `collapse` hook."""
    std_ratio: float
    chance_top1: float | None
    method: str

    def reason(self, result: dict) -> str | None:
        ratio, knn = _number(result.get("embed_std_ratio")), _number(result.get(METRIC))
        if ratio is not None and ratio < self.std_ratio:
            return f"embeddings lost their spread (embed_std_ratio {ratio:.3f})"
        if self.chance_top1 is not None and knn is not None and knn <= self.chance_top1:
            return f"kNN top-1 {knn:.3f} at chance"
        return methods.get(self.method).model.collapse(method_metrics(result))


def is_collapsed(result: dict, rule: CollapseRule) -> bool:
    return rule.reason(result) is not None


def trial_status(tune_status: str, last: dict, rule: CollapseRule) -> str:
    """completed / early-stopped / collapsed / error, or unfinished for an interrupted sweep."""
    if tune_status == "ERROR":
        return "error"
    if tune_status != "TERMINATED":
        return "unfinished"
    if last.get("completed"):
        return "completed"
    return "collapsed" if is_collapsed(last, rule) else "early-stopped"


def _cell(v):
    """A leaderboard cell: scalars as they are, lists and dicts as JSON text."""
    return v if v is None or isinstance(v, (int, float, str, bool)) else json.dumps(v)


def _eval_metrics(run_dir: str) -> dict:
    """`<stage>/<metric>` of the trial's summary.json (numbers only, stage timings left out)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        stages = json.load(f).get("eval", {})
    return {f"{stage}/{k}": v for stage, metrics in stages.items() for k, v in metrics.items()
            if k != "seconds" and _number(v) is not None}


def _last_online(run_dir: str) -> dict:
    """The last online check in the trial's own record (Tune's last result may be an epoch
    without one, for a trial that failed or was interrupted)."""
    checks = [r["online"] for r in read_records(run_dir) if r.get("online")]
    return checks[-1] if checks else {}


def _error_line(trial) -> str | None:
    path = trial.error_file
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else None


def wall_seconds(trial) -> float | None:
    """Seconds a trial ran over all its attempts: Tune restarts the clock of a trial it runs
    again after `--resume`, so the last `time_total_s` of each attempt in result.json is summed."""
    path = os.path.join(trial.local_path or "", "result.json")
    if not os.path.exists(path):
        return _number((trial.last_result or {}).get("time_total_s"))
    attempts: list[float] = []
    last_iteration = 0
    with open(path) as f:
        for line in f:
            result = json.loads(line)
            if result.get("training_iteration", 0) <= last_iteration or not attempts:
                attempts.append(0.0)
            attempts[-1] = result.get("time_total_s", 0.0)
            last_iteration = result.get("training_iteration", 0)
    return sum(attempts) if attempts else None


def trial_row(trial, sweep_dir: str, keys: list[str], rule: CollapseRule) -> dict:
    """One leaderboard row from a Tune trial and its run folder `<sweep_dir>/<trial_id>`."""
    last = trial.last_result or {}
    run_dir = os.path.join(sweep_dir, trial.trial_id)
    status = trial_status(trial.status, last, rule)
    online = last if METRIC in last else _last_online(run_dir)
    return {"trial": trial.trial_id, "status": status,
            **{k: _cell(trial.config.get(k)) for k in keys},
            "epochs": last.get("epochs_done"), "_epochs": last.get("epochs"),
            ONLINE: _number(online.get(METRIC)), SPREAD: _number(online.get("embed_std_ratio")),
            **_eval_metrics(run_dir),
            "wall_s": wall_seconds(trial),
            "checkpoint": latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None,
            "run_dir": run_dir, "error": _error_line(trial) if status == "error" else None}


def rank(rows: list[dict]) -> list[dict]:
    """By online kNN top-1 among trials that trained equally far: ASHA compares trials at the
    same epoch, so one it let train further ranks above those it stopped (their kNN is from an
    earlier epoch). Collapsed and failed trials come last."""
    def key(r: dict) -> tuple:
        done = (r["epochs"] or 0) / r["_epochs"] if r["_epochs"] else 0.0
        return (r["status"] in ("collapsed", "error"), -done, -(r[ONLINE] or 0.0), r["trial"])
    return [{k: v for k, v in r.items() if k != "_epochs"} for r in sorted(rows, key=key)]


def collect_rows(trials, sweep_dir: str, keys: list[str], rule: CollapseRule) -> list[dict]:
    return rank([trial_row(t, sweep_dir, keys, rule) for t in trials])


def columns_of(rows: list[dict], keys: list[str]) -> list[str]:
    first = ["rank", "trial", "status", *keys, "epochs", ONLINE, SPREAD]
    metrics = sorted({c for r in rows for c in r if "/" in c} - set(first))
    return first + metrics + ["wall_s", "checkpoint", "run_dir", "error"]


def write_outputs(sweep_dir: str, rows: list[dict], keys: list[str]) -> None:
    """leaderboard.csv, leaderboard.parquet, best.json and tensorboard/<trial_id>/."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"rank": i + 1, **r} for i, r in enumerate(rows)]
    columns = columns_of(rows, keys)
    table = [{c: r.get(c) for c in columns} for r in rows]
    with open(os.path.join(sweep_dir, "leaderboard.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    pq.write_table(pa.Table.from_pylist(table), os.path.join(sweep_dir, "leaderboard.parquet"))
    best = rows[0] if rows else None
    with open(os.path.join(sweep_dir, "best.json"), "w") as f:
        json.dump(_best(best, keys), f, indent=2)
    for row in rows:
        write_tensorboard(sweep_dir, row, keys)


def _best(row: dict | None, keys: list[str]) -> dict:
    if row is None:
        return {}
    return {"trial": row["trial"], "status": row["status"], "rank_metric": ONLINE,
            "params": {k: row[k] for k in keys},
            "metrics": {k: v for k, v in row.items() if "/" in k},
            "checkpoint": row["checkpoint"], "run_dir": row["run_dir"],
            "config": os.path.join(row["run_dir"], "config.yaml")}


def write_tensorboard(sweep_dir: str, row: dict, keys: list[str]) -> None:
    """`tensorboard/<trial>`: the online curves per epoch and an HParams summary, so
    `tensorboard --logdir <sweep>/tensorboard` compares trials side by side."""
    from torch.utils.tensorboard import SummaryWriter
    log_dir = os.path.join(sweep_dir, "tensorboard", row["trial"])
    shutil.rmtree(log_dir, ignore_errors=True)
    with SummaryWriter(log_dir) as w:
        for r in read_records(row["run_dir"]):
            for k, v in r.get("online", {}).items():
                w.add_scalar(f"online/{k}", v, r["epoch"] + 1)
            w.add_scalar("train/epoch_loss", r["loss"], r["epoch"] + 1)
        metrics = {f"hparam/{k}": row[k] for k in row
                   if "/" in k and _number(row[k]) is not None}
        w.add_hparams({**{k: row[k] if row[k] is not None else "" for k in keys},
                       "status": row["status"]}, metrics, run_name=".")


def format_leaderboard(rows: list[dict], keys: list[str]) -> str:
    """The leaderboard as an aligned text table: params, status, kNN, every stage's top-1."""
    top1 = sorted({c for r in rows for c in r if c.endswith("/top1")})
    columns = ["trial", "status", *keys, "epochs", ONLINE, *top1, "wall_s"]

    def text(column: str, v) -> str:
        if v is None:
            return "-"
        if column == "wall_s":
            return f"{v:.0f}"
        return f"{v:.4f}" if isinstance(v, float) and column not in keys else str(v)

    cells = [["#", *columns]] + [[str(i + 1), *(text(c, r.get(c)) for c in columns)]
                                 for i, r in enumerate(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
