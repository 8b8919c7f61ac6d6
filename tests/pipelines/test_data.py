"""Data sources through Ray Data: listed without pixels, split by key, streamed or cached, bad
images skipped and counted, held-out images never pretrained, batches that mix classes."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from methods.config import build
from pipelines.data import DataConfig, load_splits
from pipelines.listing import held_out
from pipelines.views import view_dataset
from tests.pipelines.images import BROKEN, awkward_images, write_folder


def cfg(**kw) -> DataConfig:
    return build(DataConfig, {"image_size": 16, **kw}, "data")


def keys_of(ds) -> set:
    return {r["key"] for r in ds.take_all()}


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def class_sorted_folder(root, classes: int = 10, per_class: int = 60) -> None:
    """`classes` sub-folders of tiny one-colour PNGs, listed class after class."""
    for c in range(classes):
        os.makedirs(root / f"c{c}", exist_ok=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i:04d}.png").write_bytes(_png(20 * c))


def label_entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- the split (no Ray)

def test_held_out_is_a_function_of_each_key_alone():
    keys = [f"cls{i % 4}/img{i:05d}.jpg" for i in range(20000)]
    test = held_out(keys, 0.3, seed=0)
    assert abs(test.mean() - 0.3) < 0.015
    # the same key is held out or not whatever else is listed, and in whatever order
    rev = held_out(keys[::-1], 0.3, seed=0)[::-1]
    assert (rev == test).all()
    assert (held_out(keys[:100], 0.3, seed=0) == test[:100]).all()
    # every class is split with the same probability: stratified in expectation
    labels = np.arange(20000) % 4
    for c in range(4):
        assert abs(test[labels == c].mean() - 0.3) < 0.03
    assert (held_out(keys, 0.3, seed=1) != test).mean() > 0.3  # the seed reshuffles


# ---------------------------------------------------------------- folders

@pytest.mark.ray
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_folder_source_skips_and_counts_bad_images(ray_session, tmp_path, cache):
    keys = write_folder(str(tmp_path), classes=("cat", "dog", "eel"))
    s = load_splits(cfg(source=f"folder:{tmp_path}", test_fraction=0.5, cache=cache),
                    need_labels=True)
    assert s.streamed == (cache == "none")
    pre, test = keys_of(s.pretrain), keys_of(s.probe_test)  # a streamed source reads it here
    bad = {f"{c}/{b}" for c in ("cat", "dog", "eel") for b in BROKEN}
    assert set(s.skipped) == bad
    assert s.classes == ["cat", "dog", "eel"]
    assert not pre & test and pre | test == set(keys) - bad
    rows = s.pretrain.take_all()
    assert all(r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8 for r in rows)
    assert {r["label"] for r in rows} == {0, 1, 2}
    # the held-out split is the hash of each key: the same whatever the cache
    assert test == {k for k in set(keys) - bad if held_out([k], 0.5, seed=0)[0]}


@pytest.mark.ray
def test_folder_strict_mode_fails_with_the_path(ray_session, tmp_path):
    write_folder(str(tmp_path))
    with pytest.raises(Exception, match=r"cannot decode image .*(corrupt\.png|truncated\.jpg)"):
        load_splits(cfg(source=f"folder:{tmp_path}", strict=True), need_labels=True)


@pytest.mark.ray
def test_flat_folder_is_unlabeled(ray_session, tmp_path):
    for name, data in awkward_images().items():
        (tmp_path / name).write_bytes(data)
    s = load_splits(cfg(source=f"folder:{tmp_path}"), need_labels=False)
    assert s.probe_test is None and len(s.skipped) == 2
    assert s.counts["pretrain"] == len(awkward_images()) - 2


@pytest.mark.ray
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_batches_of_a_class_sorted_folder_mix_every_class(ray_session, tmp_path, cache):
    """Drawn as a Train worker draws them (views, no local shuffle buffer): the file order is
    reshuffled before reading (streamed) or mixed once when listed (cached)."""
    class_sorted_folder(tmp_path)
    s = load_splits(cfg(source=f"folder:{tmp_path}", cache=cache, view_batch_size=32),
                    need_labels=False)
    views = view_dataset(s.pretrain, lambda images, g: {"label_view": images[:, 0, 0, 0] // 20},
                         batch_size=32, streamed=s.streamed)
    epochs = []
    for _ in range(2):
        batches = [b["label_view"] for b in views.iter_batches(batch_size=100, drop_last=True)]
        entropies = [label_entropy(b.astype(np.int64)) for b in batches]
        assert np.median(entropies) >= 0.95 * np.log(10), entropies
        epochs.append(np.concatenate(batches))
    if cache == "none":  # a new order every epoch, not only a new block order
        assert (epochs[0] != epochs[1]).mean() > 0.5


@pytest.mark.ray
def test_the_listing_is_stored_with_the_run_and_read_back(ray_session, tmp_path):
    class_sorted_folder(tmp_path / "data", classes=2, per_class=10)
    store = str(tmp_path / "run" / "data")
    first = load_splits(cfg(source=f"folder:{tmp_path / 'data'}"), need_labels=True,
                        cache_dir=store)
    assert [f for f in os.listdir(store) if f.startswith("listing-")]
    (tmp_path / "data" / "c0" / "new.png").write_bytes(_png(0))
    again = load_splits(cfg(source=f"folder:{tmp_path / 'data'}"), need_labels=True,
                        cache_dir=store)
    assert again.data_id == first.data_id and again.counts == first.counts  # the same split
    fresh = load_splits(cfg(source=f"folder:{tmp_path / 'data'}"), need_labels=True)
    assert sum(fresh.counts[k] for k in ("pretrain", "probe_test")) == 21


# ---------------------------------------------------------------- Parquet and WebDataset

@pytest.mark.ray
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_parquet_source_in_files_and_row_groups_with_string_labels(ray_session, tmp_path, cache):
    files = awkward_images()
    rows = [{"image": data, "label": cls, "note": name}
            for cls in ("a", "b") for name, data in files.items()]
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows[:9])), folder / "part-0.parquet",
                   row_group_size=4)
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows[9:])), folder / "part-1.parquet",
                   row_group_size=3)
    s = load_splits(cfg(source=f"parquet:{folder}", test_fraction=0.5, cache=cache),
                    need_labels=True)
    assert s.classes == ["a", "b"]
    pre, test = keys_of(s.pretrain), keys_of(s.probe_test)
    assert len(s.skipped) == 4  # two broken images per class
    assert not pre & test and len(pre | test) == 12
    # keys name the file and the row, so every row is its own image
    assert all(k.startswith(("part-0.parquet#", "part-1.parquet#")) for k in pre | test)
    labels = {r["key"]: r["label"] for r in s.probe_test.take_all()}
    by_key = {f"part-{0 if i < 9 else 1}.parquet#{i if i < 9 else i - 9}": r["label"]
              for i, r in enumerate(rows)}
    assert all(["a", "b"][y] == by_key[k] for k, y in labels.items())


def write_shards(root, shards: int = 2, per_shard: int = 10) -> dict[str, int]:
    """WebDataset shards: sample KEY as KEY.png + KEY.cls; one broken image. key -> label."""
    os.makedirs(root, exist_ok=True)
    truth = {}
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                label = (s * per_shard + i) % 3
                image = b"broken" if (s, i) == (1, 4) else _png(40 * label)
                for name, data in ((f"sample{i:03d}.png", image),
                                   (f"sample{i:03d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                truth[f"shard-{s:04d}.tar/sample{i:03d}"] = label
    return truth


@pytest.mark.ray
def test_webdataset_shards_with_class_members(ray_session, tmp_path):
    truth = write_shards(tmp_path / "wds")
    s = load_splits(cfg(source=f"webdataset:{tmp_path / 'wds'}", cache="none",
                        test_fraction=0.4), need_labels=True)
    assert s.classes == ["0", "1", "2"]
    rows = s.pretrain.take_all() + s.probe_test.take_all()
    assert s.skipped == ["shard-0001.tar/sample004"]
    assert {r["key"]: r["label"] for r in rows} == {
        k: v for k, v in truth.items() if k != "shard-0001.tar/sample004"}
    assert all(int(r["image"][0, 0, 0]) == 40 * r["label"] for r in rows)


# ---------------------------------------------------------------- embedded

@pytest.mark.ray
def test_eval_source_is_the_held_out_split(ray_session, tmp_path):
    write_folder(str(tmp_path / "train"))
    write_folder(str(tmp_path / "test"), classes=("cat", "dog"))
    s = load_splits(cfg(source=f"folder:{tmp_path / 'train'}",
                        eval_source=f"folder:{tmp_path / 'test'}"), need_labels=True)
    assert s.counts["pretrain"] == 12 and s.counts["probe_test"] == 12


@pytest.mark.ray
def test_digits_split_is_fixed_stratified_and_disjoint(ray_session):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    s = load_splits(cfg(source="digits", decode_size=24), need_labels=True)
    assert s.counts == {"pretrain": 1257, "skipped": 0, "probe_train": 1257, "probe_test": 540}
    test = keys_of(s.probe_test)
    assert not keys_of(s.pretrain) & test
    y = load_digits().target
    _, expected = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    assert test == {f"digits/{i:06d}" for i in expected}
    # pretraining images at decode_size for the views to crop; the probes whole, at image_size
    assert s.pretrain.take(1)[0]["image"].shape == (24, 24, 3)
    assert s.probe_test.take(1)[0]["image"].shape == (16, 16, 3)
