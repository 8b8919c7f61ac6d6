"""The README's methods table: every shipped config trained with `selfsup run`, against random init.

    python -m benchmarks.methods_table                  # every configs/<method>.yaml, one by one
    python -m benchmarks.methods_table --only mae,dino  # some; the others keep their last figures
    python -m benchmarks.methods_table --render         # only rewrite the README from the JSON

Each method: `selfsup run configs/<m>.yaml` in a fresh process on a fresh output folder (the
minutes are that command's wall time, Ray start-up and evaluation included), then
`selfsup baseline configs/<m>.yaml` — the same backbone at the same seed, untrained, through the
same stages. Results go to benchmarks/results/methods.json (merged by method, so a partial re-run
keeps the rest) and to the README between the markers below. Run it on a quiet machine: the
minutes are absolute times, unlike the other benchmarks' ratios.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT, load_average, machine

START, END = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"
README = ROOT / "README.md"
OUT = ROOT / "outputs" / "methods_table"


def method_order() -> list[str]:
    """Every registered method that ships a config, in registration order (methods/__init__.py):
    a new method's row appears without a change here."""
    import methods
    return [m for m in methods.METHODS if (ROOT / "configs" / f"{m}.yaml").exists()]

BASELINES = ("Raw pixels, linear probe on digits: 0.970; random-init ResNet-18, linear: 0.80 "
             "(../shared/REFERENCES.md, measured on this machine).")


def _selfsup(*args: str) -> tuple[float, str]:
    """Wall seconds and combined output of one `selfsup` command in a fresh process."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"selfsup {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _pretext(eval_results: dict) -> dict:
    return {k: v for k, v in eval_results.get("pretext", {}).items()
            if isinstance(v, (int, float)) and k not in ("seconds", "n_images")}


def measure(method: str) -> dict:
    config = f"configs/{method}.yaml"
    out = ["--set", f"output.dir={OUT}"]
    for name in (method, f"{method}-random-init"):
        shutil.rmtree(OUT / name, ignore_errors=True)
    load_before = load_average()
    seconds, _ = _selfsup("run", config, "--name", method, *out)
    trained = _summary(OUT / method)
    base_seconds, _ = _selfsup("baseline", config, *out)
    base = _summary(OUT / f"{method}-random-init")
    t = trained["train"]
    return {"method": method, "config": config, "run_seconds": round(seconds, 1),
            "train_seconds": round(t.get("wall_s", float("nan")), 1), "epochs": t.get("epochs"),
            "data": trained.get("train", {}).get("data"),
            "knn": trained["eval"]["knn"]["top1"], "linear": trained["eval"]["linear"]["top1"],
            "pretext": _pretext(trained["eval"]),
            "random_init": {"knn": base["eval"]["knn"]["top1"],
                            "linear": base["eval"]["linear"]["top1"],
                            "pretext": _pretext(base["eval"]), "seconds": round(base_seconds, 1)},
            "load_before": load_before, "load_after": load_average(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _fmt_pretext(p: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if abs(v) < 10 else f"{k} {v:.1f}" for k, v in p.items()) or "-"


def render(results: dict) -> str:
    order = method_order()
    rows = [results["methods"][m] for m in order if m in results["methods"]]
    lines = ["| method | data | pretext metric (random init) | kNN top-1 | linear top-1 | "
             "random init: kNN / linear | beats random init | minutes (`selfsup run`) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = r["random_init"]
        pretext = _fmt_pretext(r["pretext"])
        if r["pretext"]:
            pretext += f" ({_fmt_pretext(base['pretext'])})"
        source = Path(r["config"]).stem
        lines.append(
            f"| `{r['method']}` | {_source(source)} | {pretext} | {r['knn']:.3f} | "
            f"{r['linear']:.3f} | {base['knn']:.3f} / {base['linear']:.3f} | "
            f"{'yes' if r['linear'] > base['linear'] else '**no**'} | "
            f"{r['run_seconds'] / 60:.1f} |")
    loads = [max(r["load_before"][0], r["load_after"][0]) for r in rows]
    dates = sorted(r["measured"][:10] for r in rows)
    span = "?" if not dates else (f"on {dates[0]}" if dates[0] == dates[-1]
                                  else f"{dates[0]} to {dates[-1]}")
    m = results.get("machine", {})
    return "\n".join([
        "Every shipped config, `selfsup run configs/<method>.yaml` as it is, on the test split of "
        "its data; the random-init column is `selfsup baseline configs/<method>.yaml`: the same "
        "backbone at the same seed, untrained, through the same stages. Minutes are the whole "
        "command (Ray start-up, training, evaluation). Regenerate with "
        "`python -m benchmarks.methods_table`.", "", *lines, "",
        BASELINES, "",
        f"<sub>{m.get('cpu_count', '?')} x {m.get('cpu_model', '?')}; torch {m.get('torch', '?')}, "
        f"Ray {m.get('ray', '?')}; rows measured {span} (each row's date and load are in "
        f"benchmarks/results/methods.json); highest 1-minute load average seen: "
        f"{max(loads) if loads else float('nan'):.1f}.</sub>", ""])


def _source(stem: str) -> str:
    path = ROOT / "configs" / f"{stem}.yaml"
    import yaml
    data = yaml.safe_load(path.read_text()).get("data", {}) if path.exists() else {}
    return f"{data.get('source', 'digits')} {data.get('image_size', '?')} px"


def update_readme(results: dict, readme: Path = README) -> None:
    text = readme.read_text()
    block = f"{START}\n{render(results)}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "RESULTS_TABLE" in text:
        text = text.replace("RESULTS_TABLE", block, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated methods (default: all)")
    p.add_argument("--render", action="store_true", help="only rewrite the README from the JSON")
    args = p.parse_args(argv)
    path = RESULTS_DIR / "methods.json"
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    if not args.render:
        order = method_order()
        chosen = args.only.split(",") if args.only else order
        unknown = sorted(set(chosen) - set(order))
        if unknown:
            raise SystemExit(f"--only: unknown method(s) {unknown}; choose from {', '.join(order)}")
        results["machine"] = machine()
        for method in chosen:
            print(f"{method}: training and evaluating ...", flush=True)
            r = measure(method)
            results["methods"][method] = r
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
            print(f"{method}: kNN {r['knn']:.3f}, linear {r['linear']:.3f} (random init "
                  f"{r['random_init']['linear']:.3f}), {r['run_seconds'] / 60:.1f} min", flush=True)
    update_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
