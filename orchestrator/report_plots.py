"""The report's plots as PNG bytes, drawn on matplotlib's Agg canvas (no display, no pyplot state).

Each function returns None when there is nothing to draw, so the report leaves the section out.
"""
from __future__ import annotations

import io

import numpy as np


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def png_of(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def training_curves(records: list[dict]) -> bytes | None:
    """Loss per epoch and, when recorded, the online kNN top-1, from metrics.jsonl records."""
    if not records:
        return None
    online = [(r["epoch"] + 1, r["online"]["knn_top1"]) for r in records
              if "knn_top1" in r.get("online", {})]
    fig = _figure(9.6 if online else 6.4, 3.4)
    ax = fig.add_subplot(1, 2 if online else 1, 1)
    ax.plot([r["epoch"] + 1 for r in records], [r["loss"] for r in records], marker="o", ms=3)
    ax.set(title="pretraining loss", xlabel="epoch", ylabel="loss")
    _integer_x(ax)
    if online:
        ax = fig.add_subplot(1, 2, 2)
        ax.plot(*zip(*online), marker="o", ms=3, color="tab:green")
        ax.set(title="online kNN top-1", xlabel="epoch", ylabel="top-1", ylim=(0, 1))
        _integer_x(ax)
    return png_of(fig)


def robustness_curves(curves: dict | None) -> bytes | None:
    """Top-1 against severity per corruption, from stages/robustness/curves.json."""
    if not curves or not curves.get("top1"):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for name, accs in curves["top1"].items():
        ax.plot(curves["severities"], accs, marker="o", label=name.replace("_", " "))
    ax.set(title="linear probe under corruption", xlabel="severity (0 = clean)", ylabel="top-1",
           ylim=(0, 1), xticks=curves["severities"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_of(fig)


def lowshot_bars(metrics: dict | None) -> bytes | None:
    """Grouped bars: top-1 per labeled fraction, one bar per protocol (linear, finetune)."""
    scores = {k: v for k, v in (metrics or {}).items()
              if k.startswith(("linear_", "finetune_")) and isinstance(v, (int, float))}
    if not scores:
        return None
    fractions = sorted({k.split("_", 1)[1] for k in scores}, key=lambda t: float(t[:-3]))
    protocols = [p for p in ("linear", "finetune") if any(k.startswith(p) for k in scores)]
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(protocols)
    for i, p in enumerate(protocols):
        values = [scores.get(f"{p}_{f}", np.nan) for f in fractions]
        bars = ax.bar(np.arange(len(fractions)) + i * width, values, width, label=p)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(np.arange(len(fractions)) + width * (len(protocols) - 1) / 2,
                  [f.replace("pct", "% labels") for f in fractions])
    ax.set(title="low-shot top-1", ylabel="top-1", ylim=(0, 1.2), yticks=np.linspace(0, 1, 6))
    ax.legend(fontsize=8, loc="upper center", ncol=len(protocols))
    return png_of(fig)


def leaderboard_bars(runs: list[str], scores: dict[str, list[float]]) -> bytes | None:
    """Grouped bars of each stage's top-1 per run; `scores` = {stage: [top-1 per run]}."""
    scores = {s: v for s, v in scores.items() if any(x == x for x in v)}
    if not runs or not scores:
        return None
    fig = _figure(max(6.4, 1.1 * len(runs) + 2), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(scores)
    for i, (stage, values) in enumerate(scores.items()):
        ax.bar(np.arange(len(runs)) + i * width, values, width, label=f"{stage} top-1")
    ax.set_xticks(np.arange(len(runs)) + width * (len(scores) - 1) / 2, runs, rotation=30,
                  ha="right", fontsize=8)
    ax.set(title="top-1 per run", ylabel="top-1", ylim=(0, 1.2), yticks=np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(scores))
    return png_of(fig)
