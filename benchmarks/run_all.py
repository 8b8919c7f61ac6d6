"""`make bench`: every benchmark in its own process, then the README's benchmark section.

Each benchmark writes benchmarks/results/<name>.json; this adds results/run_all.json (how long
each took, the load average around it) and regenerates the README between its markers. On a
shared machine, `--wait-load 2.5` first waits (at most `--wait-max` seconds) for a quieter moment.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import RESULTS_DIR, ROOT, load_average
from benchmarks.readme import update_readme

BENCHMARKS = ("scale", "views_profile", "data_throughput", "train_overhead", "memory_negatives",
              "gpu_readiness")
# Seconds a benchmark may take; the first `scale` run also writes its 100k-image folder.
TIMEOUTS = {"scale": 1800.0}


def wait_for_quiet(threshold: float, max_seconds: float, poll: float = 30.0) -> dict:
    """Poll the 1-minute load average until it is below `threshold` or `max_seconds` pass."""
    start = time.time()
    while load_average()[0] >= threshold and time.time() - start < max_seconds:
        time.sleep(poll)
    return {"threshold": threshold, "waited_s": round(time.time() - start),
            "quiet": load_average()[0] < threshold}


def run_one(name: str, timeout: float) -> dict:
    before, start = load_average(), time.time()
    try:
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    return {"returncode": code, "seconds": round(time.time() - start, 1),
            "load_before": before, "load_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument("--wait-load", type=float, default=None, metavar="LOAD")
    p.add_argument("--wait-max", type=float, default=5400.0, metavar="SECONDS")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per benchmark")
    a = p.parse_args(argv)
    log = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "benchmarks": {}}
    if a.wait_load is not None:
        log["wait"] = wait_for_quiet(a.wait_load, a.wait_max)
    start = time.time()
    for name in a.only:
        print(f"bench: {name} ...", flush=True)
        log["benchmarks"][name] = outcome = run_one(name, max(a.timeout, TIMEOUTS.get(name, 0)))
        print(f"bench: {name} {outcome}", flush=True)
    log["total_s"] = round(time.time() - start, 1)
    (RESULTS_DIR / "run_all.json").write_text(json.dumps(log, indent=2) + "\n")
    update_readme()
    failed = [n for n, o in log["benchmarks"].items() if o["returncode"] != 0]
    print(f"bench: {log['total_s']:.0f} s in all" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
