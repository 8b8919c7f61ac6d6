"""report.html of a run and the `selfsup report` leaderboard, checked structurally (tables with the
metric values, every image an embedded PNG, nothing loaded from outside) and, when chromium is
installed, rendered by a headless browser to a screenshot that must not be blank."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.cli import main
from orchestrator.report import write_comparison, write_run_report
from pipelines.stages.tsne import scatter_png

EVAL = {
    "knn": {"top1": 0.9123, "top1_k20": 0.9123, "top1_k200": 0.8811, "seconds": 0.4},
    "linear": {"top1": 0.9456, "val_top1": 0.95, "best_lr": 0.01, "seconds": 2.0},
    "finetune": {"top1": 0.9611, "final_loss": 0.12, "seconds": 30.0},
    "lowshot": {"n_1pct": 13, "linear_1pct": 0.6172, "finetune_1pct": 0.5833, "n_10pct": 126,
                "linear_10pct": 0.8522, "finetune_10pct": 0.8333, "seconds": 40.0},
    "cluster": {"nmi": 0.7345, "ari": 0.6512, "k": 10, "seconds": 1.0},
    "tsne": {"projection": "tsne", "points": 540, "seconds": 3.0},
    "robustness": {"clean_top1": 0.9456, "gaussian_noise_s1": 0.9, "corrupt_top1": 0.7012,
                   "mean_drop": 0.2586, "seconds": 9.0},
    "efficiency": {"params": 1291712, "inference_images_per_s": 812.5, "peak_rss_mb": 701.2,
                   "seconds": 5.0},
}


def make_run(root, name: str, temperature: float = 0.5, linear_top1: float = 0.9456) -> str:
    """A run folder as `selfsup run` leaves it: summary, config, metrics.jsonl, stage artifacts."""
    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "stages", "tsne"))
    os.makedirs(os.path.join(run, "stages", "robustness"))
    results = json.loads(json.dumps(EVAL))
    results["linear"]["top1"] = linear_top1
    summary = {"run": name, "run_dir": run, "method": "simclr", "eval": results,
               "train": {"epochs": 3, "steps": 12, "final_loss": 4.2, "images_per_s": 350.0,
                         "wall_s": 75.0, "checkpoint": f"{run}/checkpoints/checkpoint_000002"}}
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump(summary, f)
    config = {"method": {"name": "simclr", "temperature": temperature, "proj_dim": 128},
              "backbone": {"name": "resnet_small", "width": 32}, "data": {"source": "digits",
                                                                          "image_size": 32},
              "train": {"epochs": 3, "batch_size": 256, "lr": 0.3}}
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for epoch in range(3):
            f.write(json.dumps({"epoch": epoch, "loss": 5.0 - epoch, "images_per_s": 300.0,
                                "online": {"knn_top1": 0.5 + 0.1 * epoch}}) + "\n")
    rng = np.random.default_rng(0)
    scatter_png(rng.normal(size=(60, 2)), np.repeat(np.arange(3), 20), ["a", "b", "c"], "t-SNE",
                os.path.join(run, "stages", "tsne", "tsne.png"))
    with open(os.path.join(run, "stages", "robustness", "curves.json"), "w") as f:
        json.dump({"severities": [0, 1, 2, 3], "top1": {"gaussian_noise": [0.95, 0.9, 0.8, 0.7],
                                                         "contrast": [0.95, 0.6, 0.3, 0.1]}}, f)
    return run


class Page(HTMLParser):
    """Collects tables (as rows of cell texts), <img> sources and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.urls, self.tags = [], [], [], set()
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action") and v]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path) -> tuple[Page, str]:
    text = open(path).read()
    page = Page()
    page.feed(text)
    return page, text


def assert_self_contained(page: Page, text: str) -> None:
    assert page.images, "no plots"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
            assert im.format == "PNG"
    assert all(u.startswith("data:") for u in page.urls), page.urls
    assert not {"script", "link", "iframe"} & page.tags
    assert "url(" not in text and "@import" not in text


def test_run_report_has_metric_tables_and_embedded_plots(tmp_path):
    run = make_run(tmp_path, "simclr-a")
    page, text = parse(write_run_report(run))
    assert_self_contained(page, text)
    cells = [c for t in page.tables for row in t for c in row]
    for stage, metric, shown in [("knn", "top1", "0.9123"), ("cluster", "nmi", "0.7345"),
                                 ("lowshot", "linear_1pct", "0.6172"),
                                 ("robustness", "mean_drop", "0.2586"),
                                 ("efficiency", "params", "1,291,712")]:
        row = next(r for t in page.tables for r in t if r and r[0] == stage)
        assert f"{metric} {shown}" in row[1], (stage, row)
    assert "1m15s" in cells                                 # training wall time in the header
    assert any(c.startswith("simclr (Chen") for c in cells)  # the method and its paper
    # curves, t-SNE, robustness curves, low-shot bars
    assert len(page.images) == 4
    assert "temperature: 0.5" in text                 # the resolved config


def test_report_leaves_out_sections_of_stages_not_run(tmp_path):
    run = make_run(tmp_path, "only-knn")
    summary = json.load(open(os.path.join(run, "summary.json")))
    summary["eval"] = {"knn": summary["eval"]["knn"]}
    json.dump(summary, open(os.path.join(run, "summary.json"), "w"))
    page, text = parse(write_run_report(run))
    assert len(page.images) == 1 and "Robustness" not in text and "Low-shot" not in text


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install chromium) - the browser "
                           "rendering check needs it; the structural checks above still run")
def test_report_renders_in_a_headless_browser(tmp_path):
    path = write_run_report(make_run(tmp_path, "rendered"))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,3000", f"file://{path}"],
                   check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (3000, 1200)
    assert pixels.std() > 20                              # not a blank page
    dark_rows = (pixels < 128).sum(axis=1) > 0            # rows with text or plot lines
    assert dark_rows[:1500].mean() > 0.2 and dark_rows[1500:].mean() > 0.2


def test_leaderboard_compares_runs_and_sweep_folders(tmp_path):
    a = make_run(tmp_path / "runs", "a", temperature=0.5, linear_top1=0.90)
    b = make_run(tmp_path / "runs", "b", temperature=0.2, linear_top1=0.95)
    sweep = tmp_path / "sweep1"
    make_run(sweep, "trial_0", temperature=0.1, linear_top1=0.80)
    make_run(sweep, "trial_1", temperature=0.3, linear_top1=0.97)
    assert main(["report", a, b, str(sweep)]) == 0
    page, text = parse(tmp_path / "runs" / "report.html")   # the first DIR's parent
    assert_self_contained(page, text)
    header, *rows = page.tables[0]
    assert [r[0] for r in rows] == ["trial_1", "b", "a", "trial_0"]   # best linear top-1 first
    assert {"method", "method.temperature", "linear/top1", "cluster/nmi", "wall_s"} <= set(header)
    assert rows[0][header.index("linear/top1")] == "0.9700"
    with open(tmp_path / "runs" / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["trial_1", "b", "a", "trial_0"]
    assert table[3]["method.temperature"] == "0.1" and table[0]["robustness/gaussian_noise_s1"]


def test_report_names_the_output_and_fails_cleanly_without_runs(tmp_path, capsys):
    out = tmp_path / "cmp" / "board.html"
    make_run(tmp_path, "x")
    assert main(["report", str(tmp_path / "x"), "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "cmp" / "leaderboard.csv").exists()
    assert main(["report", str(tmp_path / "cmp")]) == 1
    assert "no run" in capsys.readouterr().out
