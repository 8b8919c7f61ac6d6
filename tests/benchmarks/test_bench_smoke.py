"""Every benchmark runs end to end at tiny sizes and writes the JSON the README table is built from.

No timing is asserted (the machine is shared); what is checked is the shape `make bench` relies on:
the machine block, every side's repetitions with a median, the ratios, and the README section.
"""
from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from benchmarks import (data_throughput, gpu_readiness, memory_negatives, readme, train_overhead,
                        views_profile)

MACHINE_KEYS = {"cpu_count", "cpu_model", "python", "torch", "torchvision", "ray"}


def read(tmp_path, name: str) -> dict:
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["benchmark"] == name
    assert MACHINE_KEYS <= set(result["machine"])
    assert result["machine"]["cpu_count"] >= 1
    return result


def assert_summary(s: dict, reps: int) -> None:
    assert len(s["reps"]) == reps
    assert s["median"] == pytest.approx(sorted(s["reps"])[(reps - 1) // 2] if reps % 2 else
                                        sum(sorted(s["reps"])[reps // 2 - 1:reps // 2 + 1]) / 2,
                                        rel=1e-3)


@pytest.mark.ray
def test_data_throughput_compares_every_side(tmp_path, ray_session):
    data_throughput.run(sizes=(16,), cpus=(1,), reps=1, counts={16: 64}, batches={16: 16},
                        candidates=False, results_dir=tmp_path)
    (cell,) = read(tmp_path, "data_throughput")["cells"]
    assert (cell["image_size"], cell["cpus"], cell["batch_size"]) == (16, 1, 16)
    sides = set(data_throughput.SIDES)
    assert cell["images_per_s"].keys() == sides
    for side in sides:
        assert_summary(cell["images_per_s"][side], 1)
        assert all(x > 0 for x in cell["images_per_s"][side]["reps"])
    assert cell["ratio_ray_vs_loader_same"] == pytest.approx(
        cell["images_per_s"]["ray"]["median"] / cell["images_per_s"]["loader_same"]["median"],
        rel=1e-3)
    assert cell["images_per_epoch"] >= 64 and len(cell["load_before"]) == 3


def test_same_code_loader_yields_two_views_per_batch():
    images = views_profile.sample_images(16, 20)  # (20, 16, 16, 3)
    for side in data_throughput.LOADERS:
        batches = list(data_throughput.make_loader(side, images, 16, batch=8, workers=0))
        assert len(batches) == 2  # drop_last: 20 images, batches of 8
        assert batches[0]["view1"].shape == batches[0]["view2"].shape == (8, 3, 16, 16)
        assert batches[0]["view1"].dtype == torch.uint8
        assert not torch.equal(batches[0]["view1"], batches[0]["view2"])  # independent draws


# Stands in for `selfsup run`: the stdout line, TensorBoard events and metrics.jsonl it writes.
FAKE_RUN = textwrap.dedent("""
    import json, os, sys, time
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    args = sys.argv[1:]
    name = args[args.index("--name") + 1]
    sets = dict(a.split("=", 1) for a in args if "=" in a)
    run_dir = os.path.join(sets["output.dir"], name)
    os.makedirs(run_dir)
    print("data: digits, {'pretrain': 1257}", flush=True)
    w = EventFileWriter(os.path.join(run_dir, "tensorboard"))
    for step, tag in ((0, "views/view1"), (1, "train/loss")):
        value = Summary.Value(tag=tag, simple_value=1.0)
        w.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))
    w.close()
    epochs = int(sets["train.epochs"])
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for e in range(epochs):
            f.write(json.dumps({"epoch": e, "images_per_s": 100.0 * (e + 1)}) + "\\n")
""")


def test_train_overhead_reads_the_runs_records(tmp_path):
    fake = tmp_path / "fake_selfsup.py"
    fake.write_text(FAKE_RUN)
    result = train_overhead.run(reps=1, epochs=3, command=[sys.executable, str(fake)],
                                plain=lambda epochs, threads=0: [50.0 / (threads or 1)] * epochs,
                                results_dir=tmp_path)
    assert result == {k: v for k, v in read(tmp_path, "train_overhead").items()
                      if k in result}
    assert result["ray_images_per_s"]["reps"] == [200.0, 300.0]  # the epochs after the first
    assert result["ratio_ray_vs_plain"] == pytest.approx(250.0 / 50.0)
    assert result["ratio_ray_vs_plain_1_thread"] == pytest.approx(250.0 / 50.0)
    assert result["ratio_ray_vs_plain_best_run"] == pytest.approx(250.0 / 50.0)
    run = result["ray_runs"][0]
    assert 0 < run["data_ready_s"] and 0 < run["first_batch_s"] <= run["first_step_s"]
    assert_summary(result["first_step_s"], 1)


def test_overhead_plain_side_trains_on_the_same_split():
    from orchestrator.config import load_config
    cfg = load_config(str(train_overhead.ROOT / train_overhead.CONFIG), [])
    images = train_overhead.pretrain_images(cfg.data)
    # digits: 1,797 images, 30% held out (stratified, seed 0) as load_splits does
    assert images.shape == (1257, cfg.data.image_size, cfg.data.image_size, 3)


def test_memory_negatives_measures_each_case_in_its_own_process(tmp_path):
    cases = [("moco", "moco_v2", 8, 32), ("simclr_big", "simclr", 64, None)]
    result = memory_negatives.run(cases=cases, size=8, width=4, results_dir=tmp_path)
    assert read(tmp_path, "memory_negatives")["cases"].keys() == {"moco", "simclr_big"}
    moco, big = result["cases"]["moco"], result["cases"]["simclr_big"]
    assert (moco["negatives"], big["negatives"]) == (32, 126)  # queue; 2B - 2 other views
    assert big["peak_mb"] >= big["baseline_mb"] > 0
    assert result["ratio_peak_mb"] == pytest.approx(big["peak_mb"] / moco["peak_mb"], rel=1e-3)


@pytest.mark.ray
@pytest.mark.slow
def test_gpu_readiness_records_each_option(tmp_path, ray_session):
    result = gpu_readiness.run(options=("bf16",), images=128, results_dir=tmp_path)
    assert read(tmp_path, "gpu_readiness")["options"].keys() == {"bf16"}
    for option in result["options"].values():
        assert option["ran"] and option["steps"] == 2 and all(map(math.isfinite, option["loss"]))
    iterator = result["iterator"]
    assert iterator["prefetch_2"]["ran"] and iterator["prefetch_0"]["ran"]
    assert iterator["pin_memory"]["ran"] == iterator["cuda_available"]


def test_views_profile_and_readme_section(tmp_path):
    views_profile.run(cells=((16, 8, 1),), reps=1, results_dir=tmp_path)
    (cell,) = read(tmp_path, "views_profile")["cells"]
    assert cell["steps"]["udf_call_total"]["share"] == 1.0
    assert {"random_resized_crop", "color_jitter", "to_uint8"} <= cell["steps"].keys()
    page = tmp_path / "README.md"
    page.write_text("# title\n\nkept\n")
    readme.update_readme(page, tmp_path)
    readme.update_readme(page, tmp_path)  # idempotent: one section, text outside kept
    text = page.read_text()
    assert text.startswith("# title\n\nkept\n") and text.count(readme.START) == 1
    assert "## Benchmarks" in text and "Where a views task spends its time" in text


def test_scale_folders_are_class_sorted_and_listed_alike_by_both_sides(tmp_path):
    """The scale benchmark's folders and its listing comparison, at 60 files (the runs themselves
    are `selfsup run` commands, exercised by the training tests)."""
    from benchmarks import make_folders, scale
    small = make_folders.make_folder(tmp_path / "small", 60, workers=1)
    classes = sorted(d for d in (tmp_path / "small").iterdir() if d.is_dir())
    assert len(classes) == 10 and all(len(list(c.iterdir())) == 6 for c in classes)
    linked = make_folders.link_folder(small, tmp_path / "linked", 120)
    assert sum(len(list(c.iterdir())) for c in (tmp_path / "linked").iterdir()
               if c.is_dir()) == 120
    listed = scale.listings({60: small, 120: linked})
    assert listed["60"]["files"] == listed["60"]["torchvision_files"] == 60
    assert listed["120"]["files"] == listed["120"]["torchvision_files"] == 120
