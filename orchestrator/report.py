"""report.html: one self-contained page per run, and `selfsup report` comparing runs and sweeps.

A page carries everything inline — CSS in a <style> block, plots as base64 PNG data URIs — and
loads nothing from anywhere, so it opens offline, from a mail attachment or a CI artifact.

selfsup report DIR [DIR ...] [--out FILE]
    DIR is a run folder (it holds summary.json) or a sweep folder (its sub-folders are runs). Writes
    one leaderboard (report.html and leaderboard.csv) into the first DIR's parent, or --out.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import time
from typing import Callable

import methods
from orchestrator import report_plots as plots
from orchestrator.leaderboard import find_runs, headline_columns, leaderboard_rows, write_csv
from orchestrator.tracking import fmt_seconds, read_records

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1150px; color: #1d2330; background: #fff; }
h1 { margin-bottom: 2px; }
h2 { border-bottom: 2px solid #e3e7ee; padding-bottom: 4px; margin-top: 32px; }
.sub { color: #5b6577; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #d8dde6; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f3f5f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.meta td.num { text-align: left; }
table.board td:first-child { white-space: nowrap; font-weight: 600; }
.kv { display: inline-block; margin: 1px 14px 1px 0; white-space: nowrap;
      font-variant-numeric: tabular-nums; } .kv i { color: #5b6577; font-style: normal; }
.scroll { overflow-x: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 0 24px; }
.plots figure { flex: 1 1 480px; margin: 0; } .plots figure:first-child { flex-basis: 100%; }
img { max-width: 100%; border: 1px solid #e3e7ee; margin: 6px 0; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #d8dde6; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 22px; } .card span { color: #5b6577; font-size: 12px; }
"""

HEADLINE = (("knn", "top1", "kNN top-1"), ("linear", "top1", "linear top-1"),
            ("finetune", "top1", "fine-tune top-1"), ("lowshot", "linear_1pct", "linear, 1% labels"),
            ("cluster", "nmi", "NMI"), ("cluster", "ari", "ARI"),
            ("robustness", "mean_drop", "mean corruption drop"),
            ("efficiency", "inference_images_per_s", "inference img/s"))


def fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"


def _cell(v) -> str:
    numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{fmt(v)}</td>' if numeric else f"<td>{fmt(v)}</td>"


def table(headers: list[str] | None, rows: list[list], cls: str = "") -> str:
    # <wbr> lets long dotted names ("method.temperature", "linear/top1") wrap in narrow columns
    head = "<thead><tr>" + "".join(
        f"<th>{html.escape(h).replace('.', '.<wbr>').replace('/', '/<wbr>')}</th>"
        for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>'
            f'{html.escape(title)}</title><style>{STYLE}</style></head><body>\n'
            + "\n".join(part for part in body if part) + "\n</body></html>\n")


def read_summary(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _read(path: str, mode: str = "r"):
    """A file's text (or bytes with mode "rb"), None when it is missing."""
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def _read_json(path: str):
    try:
        return json.loads(_read(path) or "null")
    except ValueError:
        return None


def _run_header(summary: dict, config_text: str) -> str:
    import yaml
    cfg = yaml.safe_load(config_text or "") or {}
    t, data, backbone = summary.get("train", {}), cfg.get("data", {}), cfg.get("backbone", {})
    name = summary.get("method", cfg.get("method", {}).get("name", "?"))
    paper = methods.METHODS[name].paper if name in methods.METHODS else ""
    rows = [["method", f"{name} ({paper})" if paper else name],
            ["backbone", ", ".join(f"{k} {v}" for k, v in backbone.items()) or "?"],
            ["data", ", ".join([str(data.get("source", "?")), f"{data.get('image_size', '?')} px",
                                *(f"{n} {k}" for k, n in (t.get("data") or {}).items() if n)])],
            ["epochs / steps", f"{t.get('epochs', '?')} / {t.get('steps', '?')}"],
            ["training wall time", fmt_seconds(t["wall_s"]) if t.get("wall_s") else "?"],
            ["training images/s", t.get("images_per_s", "?")],
            ["final loss", t.get("final_loss", "?")],
            ["checkpoint", summary.get("checkpoint") or t.get("checkpoint", "?")]]
    return "<h2>Run</h2>" + table(None, rows, cls="meta")


def _headline(results: dict) -> str:
    cards = [f'<div class="card"><b>{fmt(results[s][k])}</b><span>{html.escape(label)}</span></div>'
             for s, k, label in HEADLINE if isinstance(results.get(s, {}).get(k), (int, float))]
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _stage_table(results: dict) -> str:
    """One row per stage: its metrics as name/value pairs, and its run time."""
    if not results:
        return "<h2>Evaluation stages</h2><p>No stage was run.</p>"
    rows = []
    for stage, metrics in results.items():
        pairs = "".join(f'<span class="kv"><i>{html.escape(k)}</i> {fmt(v)}</span>'
                        for k, v in metrics.items() if k != "seconds")
        rows.append(f"<tr><td><b>{html.escape(stage)}</b></td><td>{pairs}</td>"
                    f'<td class="num">{metrics.get("seconds", 0):.1f}</td></tr>')
    return ("<h2>Evaluation stages</h2><table class=\"stages\"><thead><tr><th>stage</th>"
            f"<th>metrics</th><th>seconds</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _plots(sections: list[tuple[str, str]]) -> str:
    """Plots as captioned figures that sit side by side when the window is wide enough."""
    figures = "".join(f"<figure><h2>{html.escape(title)}</h2>{body}</figure>"
                      for title, body in sections if body)
    return f'<div class="plots">{figures}</div>' if figures else ""


def _tsne(run_dir: str) -> str:
    png = _read(os.path.join(run_dir, "stages", "tsne", "tsne.png"), "rb")
    hint = (f'<p class="sub">With image thumbnails in TensorBoard\'s projector: tensorboard '
            f'--logdir {html.escape(os.path.join(run_dir, "tensorboard"))}</p>')
    return img(png, "t-SNE") + hint if png else ""


def run_report_html(run_dir: str) -> str:
    """The HTML of a run's report, from its summary.json, metrics.jsonl, stages/ and config.yaml."""
    summary = read_summary(run_dir)
    results = summary.get("eval", {})
    config_text = _read(os.path.join(run_dir, "config.yaml")) or ""
    records = read_records(run_dir) or read_records(summary.get("run_dir") or run_dir)
    stages = os.path.join(run_dir, "stages")
    sections = [
        ("Training curves", img(plots.training_curves(records), "training curves")),
        ("t-SNE of the test features", _tsne(run_dir) if "tsne" in results else ""),
        ("Robustness", img(plots.robustness_curves(
            _read_json(os.path.join(stages, "robustness", "curves.json"))), "robustness curves")
         if "robustness" in results else ""),
        ("Low-shot", img(plots.lowshot_bars(results.get("lowshot")), "low-shot bars")),
    ]
    name = summary.get("run", os.path.basename(os.path.abspath(run_dir)))
    return page(f"selfsup — {name}", [
        f"<h1>{html.escape(name)}</h1>",
        f'<p class="sub">selfsup report, {time.strftime("%Y-%m-%d %H:%M")} — '
        f"{html.escape(run_dir)}</p>",
        _headline(results), _run_header(summary, config_text), _stage_table(results),
        _plots(sections),
        f"<h2>Resolved config</h2><pre>{html.escape(config_text)}</pre>" if config_text else ""])


def write_run_report(run_dir: str) -> str:
    path = os.path.join(run_dir, "report.html")
    with open(path, "w") as f:
        f.write(run_report_html(run_dir))
    return path


def write_report_logged(run_dir: str, log: Callable[[str], None]) -> None:
    """Write report.html; a failing plot must not cost the run its summary, so it is only logged."""
    try:
        log(f"report:      {write_run_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - the run's results are already on disk
        log(f"report.html could not be written: {e!r}")


def comparison_html(rows: list[dict], columns: list[str]) -> str:
    runs = [r["run"] for r in rows]
    scores = {s: [r.get(f"{s}/top1", float("nan")) for r in rows]
              for s in ("knn", "linear", "finetune")}
    return page("selfsup — leaderboard", [
        "<h1>Leaderboard</h1>",
        f'<p class="sub">{len(rows)} run(s), selfsup report {time.strftime("%Y-%m-%d %H:%M")}</p>',
        '<div class="scroll">'
        + table(columns, [[r.get(c, "") for c in columns] for r in rows], cls="board")
        + "</div><p class=\"sub\">Every metric of every stage is in leaderboard.csv.</p>",
        img(plots.leaderboard_bars(runs, scores), "top-1 per run")])


def write_comparison(dirs: list[str], out: str | None = None) -> tuple[str, str]:
    """(report.html, leaderboard.csv) comparing every run found under `dirs`."""
    run_dirs = [r for d in dirs for r in find_runs(d)]
    if not run_dirs:
        raise FileNotFoundError(f"no run (a folder with summary.json) under {', '.join(dirs)}")
    rows, columns = leaderboard_rows(run_dirs)
    out = out or os.path.join(os.path.dirname(os.path.abspath(dirs[0])), "report.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(comparison_html(rows, headline_columns(columns)))
    csv_path = os.path.join(os.path.dirname(os.path.abspath(out)), "leaderboard.csv")
    write_csv(csv_path, rows, columns)
    return out, csv_path


def add_parser(sub) -> None:
    p = sub.add_parser("report")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders or sweep folders")
    p.add_argument("--out", help="HTML file to write (default: report.html in the first DIR's "
                                 "parent); leaderboard.csv goes beside it")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        html_path, csv_path = write_comparison(args.dirs, args.out)
    except FileNotFoundError as e:
        print(f"selfsup report: {e}")
        return 1
    print(f"report:      {html_path}\nleaderboard: {csv_path}")
    return 0
