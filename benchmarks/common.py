"""What every benchmark records: the machine, the load on it, repeated timings and their medians.

The machine is shared and noisy, so a result is a ratio of two sides measured back to back in one
process (or in alternating fresh processes), each several times; the median is the figure.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the repository: subprocesses run from here
RESULTS_DIR = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """CPU count and model, and the versions of Python, torch, torchvision and ray."""
    import ray
    import torch
    import torchvision
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__,
            "platform": platform.platform()}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other engineers' jobs share these cores)."""
    return [round(x, 2) for x in os.getloadavg()]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: list[float]) -> dict:
    """Every repetition, and their median."""
    return {"reps": [round(v, 4) for v in values], "median": round(median(values), 4)}


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 4) if denominator else float("nan")


def write_result(name: str, result: dict, results_dir: Path | str | None = None) -> Path:
    """Write `result` with the machine description to <results_dir>/<name>.json."""
    path = Path(results_dir or RESULTS_DIR) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
