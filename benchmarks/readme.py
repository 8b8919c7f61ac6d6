"""The README's `## Benchmarks` section, rendered from benchmarks/results/*.json.

`update_readme` rewrites only what lies between the markers below (appending them at the end of
README.md the first time), so the rest of the README is never touched.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import RESULTS_DIR, ROOT

START, END = "<!-- BENCH:START -->", "<!-- BENCH:END -->"
README = ROOT / "README.md"

INTRO = """`make bench` runs every benchmark below ({total} on 2 cores) and writes
`benchmarks/results/<name>.json` (machine, versions, every repetition, medians, ratios, the load
average around each benchmark). Ratios are the result, not absolute times: both sides run back
to back in one process (or in alternating fresh processes), several times, and the median counts.
The machine these were measured on is shared; each table gives the load it saw."""

NOTES = Path(__file__).with_name("NOTES.md")  # the prose after the tables, kept by hand


def load(results_dir: Path, name: str) -> dict | None:
    path = Path(results_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mark(value: float, target: float, higher: bool = True) -> str:
    met = value >= target if higher else value <= target
    return "met" if met else "**not met**"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def data_section(d: dict) -> list[str]:
    rows = []
    for c in d["cells"]:
        ips = {k: v["median"] for k, v in c["images_per_s"].items()}
        rows.append([f"{c['image_size']} px", c["cpus"], f"{ips['ray']:,.0f}",
                     f"{ips['loader_same']:,.0f}", f"{c['ratio_ray_vs_loader_same']:.2f}",
                     _mark(c["ratio_ray_vs_loader_same"], 1.0), f"{ips['loader_tv2']:,.0f}",
                     f"{c['ratio_ray_vs_loader_tv2']:.2f}", f"{ips['ray_identity']:,.0f}"])
    head = ["images", "CPUs", "selfsup (Ray Data) img/s", "DataLoader, same code", "ratio",
            "target >= 1.0", "DataLoader, torchvision v2", "ratio", "Ray Data, no-op views"]
    sizes = {c["image_size"]: (c["images_per_epoch"], c["batch_size"]) for c in d["cells"]}
    variants = _variant_rows(d)
    epochs = "; ".join(f"{s} px: {n:,} images per epoch, batch {b}" for s, (n, b) in sizes.items())
    return ["### Data throughput: SimCLR two-view augmentation", "",
            f"Median of {d['reps']} interleaved epochs per side after one warm-up epoch each "
            f"({epochs}).", ""] + _table(head, rows) + variants


def _variant_rows(d: dict) -> list[str]:
    """Two candidate changes to the Ray side, measured in the same interleaved epochs."""
    rows = []
    for c in d["cells"]:
        ips = {k: v["median"] for k, v in c["images_per_s"].items()}
        if "ray_big_tasks" in ips:
            rows.append([f"{c['image_size']} px", c["cpus"], f"{ips['ray']:,.0f}",
                         f"{ips['ray_big_tasks']:,.0f} ({ips['ray_big_tasks'] / ips['ray']:.2f}x)",
                         f"{ips['ray_no_shuffle']:,.0f} ({ips['ray_no_shuffle'] / ips['ray']:.2f}x)",
                         f"{ips['loader_same']:,.0f}"])
    head = ["images", "CPUs", "selfsup now", "views tasks of 4 batches", "no local shuffle",
            "DataLoader, same code"]
    return ["", "Candidate changes to the Ray side, same epochs (img/s):", ""] + \
        _table(head, rows) if rows else []


def overhead_section(d: dict) -> list[str]:
    run = d["ray_runs"][0]
    plain1 = d["plain_1_thread_images_per_s"]["median"]
    rows = [[f"{d['ray_images_per_s']['median']:,.0f}",
             f"{d['plain_best_run_images_per_s']:,.0f}", f"{d['ratio_ray_vs_plain_best_run']:.2f}",
             _mark(d["ratio_ray_vs_plain_best_run"], 0.90),
             f"{d['plain_images_per_s']['median']:,.0f} ({d['ratio_ray_vs_plain']:.2f})",
             f"{plain1:,.0f} ({d['ratio_ray_vs_plain_1_thread']:.2f})",
             f"{d['first_step_s']['median']:.1f}", _mark(d["first_step_s"]["median"], 20.0, False),
             f"{run['data_ready_s']:.1f} / {run['first_batch_s']:.1f} / {run['first_step_s']:.1f}",
             f"{d['cli_start_s']:.1f}" if d.get("cli_start_s") is not None else "-"]]
    head = ["`selfsup run` img/s", "`fit_plain`, best run", "ratio", "target >= 0.90",
            "`fit_plain`, all runs (ratio)", "`fit_plain`, 1 thread (ratio)",
            "first step (s)", "target <= 20 s", "data ready / first batch / first step (s)",
            "`--print-config` (s)"]
    return ["### Training overhead: `selfsup run` against the plain loop", "",
            f"{d['config']}, {d['epochs_per_run']} epochs per run, {d['reps']} runs per side "
            "(alternating fresh processes); steady state = every epoch after each run's first.",
            ""] + _table(head, rows)


def memory_section(d: dict) -> list[str]:
    rows = [[name, c["batch_size"], c["queue_size"] or "-", c["negatives"], f"{c['step_mb']:,.0f}",
             f"{c['peak_mb']:,.0f}", f"{c['step_s']:.1f}"] for name, c in d["cases"].items()]
    head = ["case", "batch", "queue", "negatives per query", "one step adds (MB)",
            "peak RSS (MB)", "step (s)"]
    paper = d["paper"]
    return ["### Memory: MoCo's queue against SimCLR's batch", ""] + _table(head, rows) + [
        "", f"SimCLR at batch 4096 needs **{d['ratio_step_mb']:.1f}x** the step memory of MoCo at "
        f"batch 256 with a 4096-key queue (peak RSS, interpreter included: "
        f"{d['ratio_peak_mb']:.1f}x). The MoCo v2 paper: {paper['end_to_end_b4096_gb']} GB against "
        f"{paper['moco_b256_gb']} GB per GPU, {paper['ratio']}x ({paper['source']})."]


def readiness_section(d: dict) -> list[str]:
    rows = [[name, "yes" if o.get("ran") else f"no: {o.get('error')}",
             o.get("images_per_s", "-"), o.get("first_epoch_s", "-")]
            for name, o in d["options"].items()]
    it = d["iterator"]
    rows += [[f"iterator {k}", "yes" if v.get("ran") else
              ("no (needs a CUDA driver; the worker pins only on CUDA)"
               if v.get("expected_without_gpu") else f"no: {v.get('error')}"),
              v.get("images_per_s", "-"), "-"]
             for k, v in it.items() if isinstance(v, dict)]
    head = ["option", "ran on CPU", "img/s (1 thread, 2nd epoch)", "first epoch (s)"]
    return ["### GPU readiness, checked on CPU", ""] + _table(head, rows)


def profile_section(d: dict) -> list[str]:
    cells = d["cells"]
    names = list(dict.fromkeys(k for c in cells for k in c["steps"]))
    rows = [[name] + [f"{c['steps'][name]['us_per_image']:,.0f} ({c['steps'][name]['share']:.0%})"
                      if name in c["steps"] else "-" for c in cells] for name in names]
    head = ["step (cumulative)"] + [f"{c['image_size']} px, us/image (share)" for c in cells]
    env = d["by_environment"]
    speeds = [[f"{size} px", f"{e['default']['images_per_s_one_core']:,.0f}",
               f"{e['default']['minor_faults_per_image']:,.0f}",
               f"{e['hugepages']['images_per_s_one_core']:,.0f} "
               f"({e['hugepages']['images_per_s_one_core'] / e['default']['images_per_s_one_core']:.2f}x)",
               f"{e['hugepages']['minor_faults_per_image']:,.0f}"] for size, e in env.items()]
    tunable = " ".join(f"{k}={v}" for k, v in d["hugepages_env"].items())
    return ["### Where a views task spends its time (cProfile, one core)", ""] + \
        _table(head, rows) + ["", f"The same UDF in fresh processes, as a Ray worker starts "
                              f"today and with `{tunable}` (median of {d['reps']}):", ""] + \
        _table(["images", "img/s, one core", "page faults / image", "with huge pages",
                "page faults / image"], speeds)


def scale_section(d: dict) -> list[str]:
    runs, loader, listing, entropy, s = d["runs"], d["loader"], d["listing"], d["entropy"], \
        d["summary"]
    t = d["targets"]
    rows = []
    for n in ("10000", "100000"):
        r = runs[n]
        rows.append([f"{int(n):,}", r["seconds_to"].get("data_ready", "-"),
                     r["seconds_to"].get("first_step", "-"),
                     loader[n]["seconds_to"].get("first_batch", "-"),
                     f"{r['peak_above_idle_mb']:,}", r.get("spilled_mb", "-"),
                     f"{r['wall_s']:.0f}"])
    head = ["folder (files)", "`selfsup run`: data ready (s)", "first step (s)",
            "`ImageFolder` DataLoader: first batch (s)", "peak memory above idle (MiB)",
            "object store spilled (MiB)", "whole command (s)"]
    lists = [[f"{int(n):,}", v["selfsup_s"], f"{v['selfsup_s_per_1k']:.4f}", v["torchvision_s"]]
             for n, v in listing.items()]
    over = s["first_step_over_ray_s"]
    ratio = s["memory_ratio_100k_vs_10k"]
    return ["### Data at scale: folders of 10k, 100k and 1M images", "",
            f"`selfsup run configs/simclr.yaml` streaming a class-sorted folder of 64 px JPEGs "
            f"(`data.source=folder:DIR data.image_size=32 data.cache=none "
            f"cluster.object_store_mb=1024 train.max_steps={d['run_steps']}`), against the same "
            f"command on the embedded digits (Ray's own start-up: first step after "
            f"{s['ray_startup_first_step_s']} s) and a plain torchvision `ImageFolder` + "
            f"`DataLoader` (2 workers, two-view augmentation at 32 px) on the same folder.", ""] + \
        _table(head, rows) + [
            "", f"First step on the 100k folder {over:+.1f} s from Ray's own start-up (target "
            f"<= +{t['first_step_over_ray_s']:.0f} s: {_mark(over, t['first_step_over_ray_s'], False)}); "
            f"peak memory 100k / 10k = {ratio:.2f} (target <= {t['memory_ratio']}: "
            f"{_mark(ratio, t['memory_ratio'], False)}); label entropy of 256-image training "
            f"batches on the class-sorted 100k folder: median {entropy['median_nats']:.2f} nats "
            f"of log 10 = {entropy['log_classes']:.2f} ({entropy['share_of_log_classes']:.2f}; "
            f"target >= {t['entropy_share']}: "
            f"{_mark(entropy['share_of_log_classes'], t['entropy_share'])}).", "",
            "Listing (the 1M folder is hard links to the 100k one's files: listed only):", ""] + \
        _table(["files", "selfsup listing (s)", "s per 1,000 files", "torchvision "
                "`make_dataset` (s)"], lists)


SECTIONS = (("scale", scale_section), ("data_throughput", data_section), ("train_overhead", overhead_section),
            ("memory_negatives", memory_section), ("gpu_readiness", readiness_section),
            ("views_profile", profile_section))


def render(results_dir: Path | str = RESULTS_DIR) -> str:
    """The whole section between the markers, from the results found in `results_dir`."""
    log = load(results_dir, "run_all") or {}
    lines = ["## Benchmarks", "", INTRO.format(total=_total(log)) + _waited(log), ""]
    for name, section in SECTIONS:
        result = load(results_dir, name)
        lines += (section(result) if result else [f"### {name}", "", "Not run yet."]) + [""]
        if result:
            lines += [_conditions(result), ""]
    return "\n".join(lines + [NOTES.read_text().strip(), ""])


def _waited(log: dict) -> str:
    wait = log.get("wait")
    if not wait or wait["quiet"]:
        return ""
    return (f" The 1-minute load average stayed above {wait['threshold']} through a "
            f"{wait['waited_s'] / 60:.0f}-minute wait before this run, so it ran on a busy "
            f"machine.")


def _total(log: dict) -> str:
    return f"{log['total_s'] / 60:.1f} minutes" if "total_s" in log else "a few minutes"


def _conditions(result: dict) -> str:
    m = result["machine"]
    loads = [result.get("load_before"), result.get("load_after")]
    for cell in result.get("cells", []):
        loads += [cell.get("load_before"), cell.get("load_after")]
    peak = max((x[0] for x in loads if x), default=float("nan"))
    return (f"<sub>{result['created']}; {m['cpu_count']} x {m['cpu_model']}; Python {m['python']}, "
            f"torch {m['torch']}, Ray {m['ray']}; highest 1-minute load average seen: "
            f"{peak:.1f}.</sub>")


def update_readme(readme: Path = README, results_dir: Path | str = RESULTS_DIR) -> None:
    """Replace the text between the markers (append the markers at the end if they are absent)."""
    text = readme.read_text()
    block = f"{START}\n{render(results_dir)}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
