"""Ray Data datasets for pretraining and evaluation, decoded once and split without leaks.

Every source becomes rows {"image": uint8 (S, S, 3), "label": int64 (-1 when unlabeled), "key":
str}, decoded once and materialised (the "decoded cache"), then split. The split is a seeded,
stratified split over the sorted keys, so it is the same on every run and every machine, and
pretraining never sees a held-out image. Views are drawn later, after the cache, so augmentation
is redrawn every epoch (pipelines/views.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import ray

from methods.config import ConfigError, param
from pipelines.decode import decode_batch, square_resize
from pipelines.sources import SourceInfo, inspect_source, parquet_classes


@dataclass
class DataConfig:
    source: str = param("digits", help="digits | scenes | folder:PATH | parquet:PATH")
    eval_source: str | None = param(None, help="held-out labeled source (else a split of source)")
    test_fraction: float = param(0.3, gt=0, lt=1, help="held-out fraction of a labeled source")
    seed: int = param(0, help="seed of the held-out split")
    image_size: int = param(32, ge=8, le=1024, help="side of the decoded square images")
    strict: bool = param(False, help="fail on the first unreadable image instead of skipping it")
    image_column: str = param("image", help="Parquet column with encoded image bytes")
    label_column: str = param("label", help="Parquet column with labels (optional)")
    view_batch_size: int = param(256, ge=1, help="images per Ray Data views task")
    scenes_crops_per_class: int = param(300, ge=10, help="scenes: train crops per photograph")
    task_resources: dict[str, float] | None = param(
        None, help="custom resources each decode/views task needs, e.g. {data_cpu: 1}, to keep "
                   "augmentation on CPU-only nodes")
    label_selector: dict[str, str] | None = param(
        None, help="node labels decode/views tasks must land on, e.g. {selfsup/role: data}")

    def remote_args(self) -> dict:
        """Ray Data scheduling arguments for the CPU-side stages (decode, views)."""
        args: dict = {}
        if self.task_resources:
            args["resources"] = dict(self.task_resources)
        if self.label_selector:
            args["label_selector"] = dict(self.label_selector)
        return args

    def validate(self, prefix: str) -> None:
        for key in ("source", "eval_source"):
            spec = getattr(self, key)
            if spec is not None:
                inspect_source(spec, f"{prefix}.{key}", image_column=self.image_column,
                               label_column=self.label_column)


@dataclass
class Splits:
    """pretrain: what the method trains on; probe_train/probe_test: the labeled evaluation splits."""
    pretrain: ray.data.Dataset
    probe_train: ray.data.Dataset | None
    probe_test: ray.data.Dataset | None
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def stratified_test_keys(keys: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> set:
    """The keys of a seeded, stratified held-out split; independent of the order rows arrive in."""
    from sklearn.model_selection import train_test_split
    order = np.argsort(keys, kind="stable")
    keys, labels = keys[order], labels[order]
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        raise ConfigError(f"data.test_fraction: a class has {counts.min()} image(s); a stratified "
                          f"split needs at least 2 per class (or set data.eval_source)")
    _, test = train_test_split(np.arange(len(keys)), test_size=fraction, stratify=labels,
                               random_state=seed)
    return set(keys[test].tolist())


def _embedded_rows(images: np.ndarray, labels: np.ndarray, size: int, prefix: str) -> ray.data.Dataset:
    from PIL import Image
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        pil = Image.fromarray(img).convert("RGB")
        rows.append({"image": square_resize(pil, size), "label": int(y), "key": f"{prefix}/{i:06d}"})
    return ray.data.from_items(rows, override_num_blocks=max(1, min(16, len(rows) // 128)))


def _read_paths(batch: dict) -> dict:
    data = []
    for path in batch["path"]:
        try:
            with open(path, "rb") as f:
                data.append(f.read())
        except OSError:
            data.append(b"")  # unreadable: decode_batch counts it as skipped
    return {"bytes": np.array(data, dtype=object), "key": batch["key"], "label": batch["label"]}


def _parquet_rows(info: SourceInfo, cfg: DataConfig) -> ray.data.Dataset:
    columns = [cfg.image_column] + ([cfg.label_column] if info.labeled else [])
    index = {v: i for i, v in enumerate(parquet_classes(info.path, cfg.label_column))} \
        if info.labeled else {}

    def to_rows(batch: dict) -> dict:
        data = [b if isinstance(b, (bytes, bytearray)) else (b or {}).get("bytes", b"")
                for b in batch[cfg.image_column]]
        keys = [hashlib.sha1(d or b"").hexdigest() for d in data]
        labels = [index[v] for v in batch[cfg.label_column]] if info.labeled else [-1] * len(data)
        return {"bytes": np.array(data, dtype=object), "key": np.array(keys),
                "label": np.array(labels, dtype=np.int64)}

    return ray.data.read_parquet(info.path, columns=columns).map_batches(to_rows)


def _decoded(info: SourceInfo, cfg: DataConfig) -> tuple[ray.data.Dataset, list[str]]:
    """Decode a file source once; return the good rows (materialised) and the skipped keys."""
    raw = (ray.data.from_items(info.items).map_batches(_read_paths) if info.kind == "folder"
           else _parquet_rows(info, cfg))
    decoded = raw.map_batches(decode_batch, fn_kwargs={"size": cfg.image_size,
                                                       "strict": cfg.strict},
                              **cfg.remote_args()).materialize()
    meta = decoded.select_columns(["key", "ok"]).to_pandas()
    skipped = sorted(meta.loc[~meta["ok"], "key"].tolist())
    good = decoded.filter(expr="ok") if skipped else decoded
    return good.drop_columns(["ok"]).materialize(), skipped


def _without(ds: ray.data.Dataset, keys: set, keep: bool) -> ray.data.Dataset:
    """Rows whose key is in `keys` (keep=True) or not in it (keep=False), materialised."""
    ref = ray.put(np.array(sorted(keys)))

    def select(batch: dict) -> dict:
        inside = np.isin(batch["key"], ray.get(ref))
        mask = inside if keep else ~inside
        return {k: v[mask] for k, v in batch.items()}

    return ds.map_batches(select).materialize()


def _split(ds: ray.data.Dataset, cfg: DataConfig) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    meta = ds.select_columns(["key", "label"]).to_pandas()
    test = stratified_test_keys(meta["key"].to_numpy(), meta["label"].to_numpy(),
                                cfg.test_fraction, cfg.seed)
    return _without(ds, test, keep=False), _without(ds, test, keep=True)


def _load(spec: str, key: str, cfg: DataConfig) -> tuple[SourceInfo, list, list[str]]:
    """A source as [dataset] or, for `scenes` (split by photograph region), [train, test]."""
    info = inspect_source(spec, key, image_column=cfg.image_column, label_column=cfg.label_column,
                          load_arrays=True,
                          scenes_args={"crop_size": cfg.image_size,
                                       "train_per_class": cfg.scenes_crops_per_class,
                                       "test_per_class": max(10, cfg.scenes_crops_per_class // 3)})
    a = info.arrays
    if info.kind == "digits":
        return info, [_embedded_rows(a["images"], a["labels"], cfg.image_size, "digits")], []
    if info.kind == "scenes":
        return info, [_embedded_rows(a["train_images"], a["train_labels"], cfg.image_size,
                                     "scenes/train"),
                      _embedded_rows(a["test_images"], a["test_labels"], cfg.image_size,
                                     "scenes/test")], []
    ds, skipped = _decoded(info, cfg)
    return info, [ds], skipped


def load_splits(cfg: DataConfig, need_labels: bool) -> Splits:
    """Build the pretraining and probe datasets described by `cfg` (Ray must be initialised)."""
    info, parts, skipped = _load(cfg.source, "data.source", cfg)
    classes = info.classes
    if cfg.eval_source is None:
        if len(parts) == 2:
            pretrain, probe_test = parts
        elif info.labeled:
            pretrain, probe_test = _split(parts[0], cfg)
        else:
            pretrain, probe_test = parts[0], None
        probe_train = pretrain if probe_test is not None else None
    else:
        pretrain = parts[0] if len(parts) == 1 else parts[0].union(parts[1]).materialize()
        einfo, eparts, eskipped = _load(cfg.eval_source, "data.eval_source", cfg)
        skipped += [f"eval:{k}" for k in eskipped]
        classes = einfo.classes
        if info.labeled:
            probe_train = pretrain
            probe_test = eparts[-1] if len(eparts) == 1 else eparts[0].union(eparts[1])
        else:
            probe_train, probe_test = eparts if len(eparts) == 2 else _split(eparts[0], cfg)
    if need_labels and probe_test is None:
        raise ConfigError(f"eval.stages: {cfg.source} is unlabeled; give data.eval_source (a "
                          f"labeled source) or set eval.stages=[]")
    counts = {"pretrain": pretrain.count(), "skipped": len(skipped)}
    if probe_test is not None:
        counts.update(probe_train=probe_train.count(), probe_test=probe_test.count())
    return Splits(pretrain, probe_train, probe_test, classes, skipped, counts)
