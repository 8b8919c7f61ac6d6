"""Data sources through Ray Data: bad images skipped and counted, held-out images never pretrained."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from methods.config import build
from pipelines.data import DataConfig, load_splits, stratified_test_keys
from tests.pipelines.images import BROKEN, awkward_images, write_folder

pytestmark = pytest.mark.ray


def cfg(**kw) -> DataConfig:
    return build(DataConfig, {"image_size": 16, **kw}, "data")


def keys_of(ds) -> set:
    return set(ds.select_columns(["key"]).to_pandas()["key"])


def test_folder_source_skips_and_counts_bad_images(ray_session, tmp_path):
    keys = write_folder(str(tmp_path), classes=("cat", "dog", "eel"))
    s = load_splits(cfg(source=f"folder:{tmp_path}", test_fraction=0.5), need_labels=True)
    assert sorted(s.skipped) == sorted(f"{c}/{b}" for c in ("cat", "dog", "eel") for b in BROKEN)
    n_good = len(keys) - len(s.skipped)
    assert s.counts["pretrain"] + s.counts["probe_test"] == n_good
    assert s.classes == ["cat", "dog", "eel"]
    pre, test = keys_of(s.pretrain), keys_of(s.probe_test)
    assert not pre & test and len(pre | test) == n_good
    rows = s.pretrain.take_all()
    assert all(r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8 for r in rows)
    assert {r["label"] for r in rows} == {0, 1, 2}


def test_folder_strict_mode_fails_with_the_path(ray_session, tmp_path):
    write_folder(str(tmp_path))
    with pytest.raises(Exception, match=r"cannot decode image .*(corrupt\.png|truncated\.jpg)"):
        load_splits(cfg(source=f"folder:{tmp_path}", strict=True), need_labels=True)


def test_flat_folder_is_unlabeled(ray_session, tmp_path):
    for name, data in awkward_images().items():
        (tmp_path / name).write_bytes(data)
    s = load_splits(cfg(source=f"folder:{tmp_path}"), need_labels=False)
    assert s.probe_test is None and len(s.skipped) == 2
    assert s.counts["pretrain"] == len(awkward_images()) - 2


def test_parquet_source_with_string_labels(ray_session, tmp_path):
    files = awkward_images()
    rows = [{"image": data, "label": cls, "note": name}
            for cls in ("a", "b") for name, data in files.items()]
    # distinct bytes per class so content keys differ
    for r in rows:
        if r["label"] == "b" and r["note"] not in BROKEN:
            r["image"] = awkward_images(seed=7)[r["note"]]
    pd.DataFrame(rows).to_parquet(tmp_path / "data.parquet")
    s = load_splits(cfg(source=f"parquet:{tmp_path / 'data.parquet'}", test_fraction=0.5),
                    need_labels=True)
    assert s.classes == ["a", "b"]
    # two broken files per class; identical broken bytes share a key, so count rows not keys
    assert s.counts["skipped"] == 4
    assert s.counts["pretrain"] + s.counts["probe_test"] == 12
    assert not keys_of(s.pretrain) & keys_of(s.probe_test)


def test_eval_source_is_the_held_out_split(ray_session, tmp_path):
    write_folder(str(tmp_path / "train"))
    write_folder(str(tmp_path / "test"), classes=("cat", "dog"))
    s = load_splits(cfg(source=f"folder:{tmp_path / 'train'}",
                        eval_source=f"folder:{tmp_path / 'test'}"), need_labels=True)
    assert s.counts["pretrain"] == 12 and s.counts["probe_test"] == 12


def test_digits_split_is_fixed_stratified_and_disjoint(ray_session):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    s = load_splits(cfg(source="digits"), need_labels=True)
    assert s.counts == {"pretrain": 1257, "skipped": 0, "probe_train": 1257, "probe_test": 540}
    test = keys_of(s.probe_test)
    assert not keys_of(s.pretrain) & test
    y = load_digits().target
    _, expected = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    assert test == {f"digits/{i:06d}" for i in expected}


def test_stratified_keys_ignore_row_order():
    keys = np.array([f"k{i:03d}" for i in range(100)])
    labels = np.arange(100) % 4
    a = stratified_test_keys(keys, labels, 0.2, seed=3)
    perm = np.random.default_rng(0).permutation(100)
    assert a == stratified_test_keys(keys[perm], labels[perm], 0.2, seed=3)
    held = np.isin(keys, sorted(a))
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
