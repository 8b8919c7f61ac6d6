"""Ray Data datasets for pretraining and evaluation: listed, split by key, read where they live.

A file source is first *listed* (pipelines/listing.py: keys, labels, where each image is; no
pixels) and split by a hash of each key, then read by Ray Data tasks: each epoch reads the
encoded bytes, decodes and (pipelines/views.py) augments them in parallel, streaming into the
Train workers, so nothing the size of the dataset is held anywhere. The pretraining listing is
reshuffled every epoch before any image is read, so batches mix classes whatever the folder order.

`data.cache` keeps the decoded images in Ray's object store instead (decoded once, views still
redrawn every epoch): `memory` always, `none` never, `auto` when the decoded set is at most
AUTO_CACHE_SHARE of the object store. The embedded sources are arrays in memory to begin with.

Rows are {"image": uint8 (S, S, 3), "label": int64 (-1 unlabeled), "key": str} with S =
`data.decode_size` (default `data.image_size`); the method's views crop and resize from there.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import ray

from methods.config import ConfigError, param
from pipelines import readers
from pipelines.decode import square_resize
from pipelines.listing import Listing, held_out, list_source
from pipelines.sources import inspect_source, parse_source

# `cache: auto` keeps decoded images in memory when they fill at most this share of the object
# store: room stays for the views, the training batches and the evaluation stages.
AUTO_CACHE_SHARE = 0.1
MAX_READ_BLOCKS = 64  # blocks of a listing: tasks per epoch, and the size of its shuffle


@dataclass
class DataConfig:
    source: str = param("digits", help="digits | scenes | folder:LOCATION | parquet:LOCATION | "
                                       "webdataset:LOCATION; LOCATION a path or a file://, s3:// "
                                       "or gs:// URI")
    eval_source: str | None = param(None, help="held-out labeled source (else a split of source)")
    test_fraction: float = param(0.3, gt=0, lt=1, help="held-out fraction of a labeled source")
    seed: int = param(0, help="seed of the held-out split")
    image_size: int = param(32, ge=8, le=1024, help="side of the images the method trains on")
    decode_size: int | None = param(
        None, ge=8, le=4096, help="side of the square images are decoded to before the views "
                                  "crop them (None: image_size); larger keeps detail for random "
                                  "resized crops, e.g. 256 for 224 px views")
    cache: str = param("auto", choices=("auto", "memory", "none"),
                       help="keep decoded images in the object store (memory), stream them from "
                            "storage every epoch (none), or memory when they fit (auto)")
    strict: bool = param(False, help="fail on the first unreadable image instead of skipping it")
    image_column: str = param("image", help="Parquet column with encoded image bytes")
    label_column: str = param("label", help="Parquet column with labels (optional)")
    endpoint_url: str | None = param(
        None, help="S3-compatible endpoint for s3:// sources (MinIO, Ceph), e.g. "
                   "http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL, else AWS); credentials "
                   "come from the environment, never from the config")
    view_batch_size: int = param(256, ge=1, help="images per Ray Data decode/views task batch")
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

    @property
    def decoded_size(self) -> int:
        return self.decode_size or self.image_size

    def validate(self, prefix: str) -> None:
        """Syntax only: whether the sources exist is checked where the job runs (check_data)."""
        for key in ("source", "eval_source"):
            spec = getattr(self, key)
            if spec is not None:
                parse_source(spec, f"{prefix}.{key}")
        if self.decode_size is not None and self.decode_size < self.image_size:
            raise ConfigError(f"{prefix}.decode_size: {self.decode_size} is smaller than "
                              f"{prefix}.image_size = {self.image_size}; views would upsample "
                              f"every crop; leave it unset or raise it")


@dataclass
class Splits:
    """pretrain: what the method trains on; probe_train/probe_test: the labeled evaluation splits.

    `streamed`: pretrain is read from storage every epoch (reshuffled) rather than from a cache.
    `data_id`: a digest of the labeled splits (keys, labels, image size) for stage fingerprints.
    """
    pretrain: ray.data.Dataset
    probe_train: ray.data.Dataset | None
    probe_test: ray.data.Dataset | None
    classes: list[str]
    counts: dict = field(default_factory=dict)
    streamed: bool = False
    data_id: str = ""
    skip_log: Any = None
    known_skipped: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> list[str]:
        """Keys of the images found unreadable so far (a streamed source finds them as it reads)."""
        if self.skip_log is None:
            return list(self.known_skipped)
        return sorted(set(self.known_skipped) | set(ray.get(self.skip_log.keys.remote())))


def stratified_test_keys(keys: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> set:
    """The embedded sets' fixed split: seeded, stratified, independent of the rows' order."""
    from sklearn.model_selection import train_test_split
    order = np.argsort(keys, kind="stable")
    keys, labels = keys[order], labels[order]
    _, test = train_test_split(np.arange(len(keys)), test_size=fraction, stratify=labels,
                               random_state=seed)
    return set(keys[test].tolist())


# ---------------------------------------------------------------- a source's parts

@dataclass
class _Part:
    """Images of one source not yet read: `rows` has key and label (+ where to read them)."""
    rows: pa.Table
    kind: str                       # embedded | folder | parquet | webdataset
    location: str = ""
    images: np.ndarray | None = None  # embedded: the images (N, H, W[, 3]), by rows["index"]

    def take(self, mask: np.ndarray) -> "_Part":
        return _Part(self.rows.filter(pa.array(mask)), self.kind, self.location, self.images)

    def union(self, other: "_Part") -> "_Part":
        if self.kind == "embedded":
            offset = len(self.images)
            rows = other.rows.set_column(other.rows.column_names.index("index"), "index",
                                         pa.array(other.rows["index"].to_numpy() + offset))
            return _Part(pa.concat_tables([self.rows, rows]), "embedded", "",
                         np.concatenate([self.images, other.images]))
        return _Part(pa.concat_tables([self.rows, other.rows]), self.kind, self.location)


def _embedded(images: np.ndarray, labels: np.ndarray, prefix: str) -> _Part:
    rows = pa.table({"key": [f"{prefix}/{i:06d}" for i in range(len(images))],
                     "label": pa.array(labels, pa.int64()),
                     "index": pa.array(np.arange(len(images)), pa.int64())})
    return _Part(rows, "embedded", images=images)


def _open(spec: str, key: str, cfg: DataConfig, cache_dir: str | None
          ) -> tuple[list[_Part], list[str], bool]:
    """A source as ([part] or, for `scenes` (split by photograph region), [train, test]),
    its class names, and whether it is labeled."""
    info = inspect_source(spec, key, cfg, load_arrays=True,
                          scenes_args={"crop_size": cfg.image_size,
                                       "train_per_class": cfg.scenes_crops_per_class,
                                       "test_per_class": max(10, cfg.scenes_crops_per_class // 3)})
    a = info.arrays
    if info.kind == "digits":
        return [_embedded(a["images"], a["labels"], "digits")], info.classes, True
    if info.kind == "scenes":
        return [_embedded(a["train_images"], a["train_labels"], "scenes/train"),
                _embedded(a["test_images"], a["test_labels"], "scenes/test")], \
            info.classes, True
    cache = None
    if cache_dir:
        name = hashlib.sha1(f"{info.kind}:{info.location}".encode()).hexdigest()[:16]
        cache = f"{cache_dir}/listing-{name}.parquet"
    listing: Listing = list_source(info, cfg.endpoint_url, image_column=cfg.image_column,
                                   label_column=cfg.label_column, key=key, cache=cache)
    # Listings come class by class; one seeded permutation mixes them, so even a dataset read
    # in listing order (a decoded cache, the probes) has blocks of every class.
    order = np.random.default_rng(cfg.seed).permutation(listing.table.num_rows)
    return [_Part(listing.table.take(order), info.kind, info.location)], listing.classes, \
        listing.labeled


def _split(part: _Part, cfg: DataConfig) -> tuple[_Part, _Part]:
    """(kept, held out): the embedded sets' fixed stratified split, else the hash of each key."""
    keys = part.rows["key"].to_numpy(zero_copy_only=False)
    if part.kind == "embedded":
        test = np.isin(keys, sorted(stratified_test_keys(
            keys, part.rows["label"].to_numpy(), cfg.test_fraction, cfg.seed)))
    else:
        test = held_out(keys, cfg.test_fraction, cfg.seed)
    if test.all() or not test.any():
        raise ConfigError(f"data.test_fraction: {cfg.test_fraction} of {len(keys)} images leaves "
                          f"one split empty; use more images or another fraction")
    return part.take(~test), part.take(test)


# ---------------------------------------------------------------- reading a part

def _blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    n = max(1, min(MAX_READ_BLOCKS, math.ceil(table.num_rows / max(1, rows_per_block))))
    step = math.ceil(table.num_rows / n) or 1
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]


def _units(part: _Part) -> pa.Table:
    """Parquet rows grouped by row group, WebDataset rows by shard: the units a task reads."""
    by = ["file", "row_group"] if part.kind == "parquet" else ["shard"]
    within = "row" if part.kind == "parquet" else "sample"
    g = part.rows.group_by(by).aggregate([(within, "list"), ("key", "list"), ("label", "list")])
    return pa.table({**{c: g[c] for c in by}, f"{within}s": g[f"{within}_list"],
                     "keys": g["key_list"], "labels": g["label_list"]})


def _read(part: _Part, cfg: DataConfig, size: int, shuffle: bool, skip_log) -> ray.data.Dataset:
    """The images of a part decoded to `size`, as a lazily read dataset; `shuffle` reorders it
    every epoch."""
    from PIL import Image
    remote = cfg.remote_args()
    if part.kind == "embedded":
        rows = part.rows.to_pydict()
        items = [{"image": square_resize(Image.fromarray(part.images[i]).convert("RGB"), size),
                  "label": y, "key": k}
                 for i, y, k in zip(rows["index"], rows["label"], rows["key"])]
        return ray.data.from_items(items, override_num_blocks=max(1, min(16, len(items) // 128)))
    common = {"location": part.location, "endpoint_url": cfg.endpoint_url}
    if part.kind == "folder":
        ds = ray.data.from_blocks(_blocks(part.rows, cfg.view_batch_size))
        if shuffle:
            ds = ds.random_shuffle()
        return ds.map_batches(readers.read_files, batch_size=cfg.view_batch_size,
                              fn_kwargs={**common, "size": size, "strict": cfg.strict,
                                         "skip_log": skip_log}, **remote)
    units = _units(part)
    ds = ray.data.from_blocks(_blocks(units, 1))
    if shuffle:
        ds = ds.random_shuffle()
    reader = readers.read_parquet_units if part.kind == "parquet" else readers.read_wds_units
    extra = {"image_column": cfg.image_column} if part.kind == "parquet" else {}
    ds = ds.map_batches(reader, batch_size=1, fn_kwargs={**common, **extra, "shuffle": shuffle,
                                                         "chunk": cfg.view_batch_size}, **remote)
    return ds.map_batches(readers.decode_rows, batch_size=cfg.view_batch_size,
                          fn_kwargs={"size": size, "strict": cfg.strict, "skip_log": skip_log},
                          **remote)


# ---------------------------------------------------------------- the splits

def _digest(parts: list[_Part | None], size: int) -> str:
    """Order-independent digest of the parts' keys and labels, and the decoded size."""
    h = hashlib.sha1(str(size).encode())
    for part in parts:
        if part is None:
            h.update(b"none")
            continue
        pairs = (f"{k}\t{y}" for k, y in zip(part.rows["key"].to_pylist(),
                                              part.rows["label"].to_pylist()))
        total = sum(int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
                    for p in pairs) % 2**64
        h.update(f"{part.rows.num_rows}:{total}".encode())
    return h.hexdigest()


def _use_cache(cfg: DataConfig, parts: list[_Part], log: Callable[[str], None]) -> bool:
    """Whether the decoded images go to the object store (see `data.cache`); says so when the
    decoding takes a while."""
    n = sum(p.rows.num_rows for p in parts)
    size = n * cfg.decoded_size ** 2 * 3
    store = ray.cluster_resources().get("object_store_memory", 0)
    cached = cfg.cache == "memory" or (cfg.cache == "auto" and size <= AUTO_CACHE_SHARE * store)
    if cached and any(p.kind != "embedded" for p in parts) and n >= 10_000:
        log(f"data: decoding {n:,} images once into Ray's object store ({size / 2**20:,.0f} MiB, "
            f"{size / max(store, 1):.0%} of it; data.cache={cfg.cache}); data.cache=none streams "
            f"them from storage every epoch instead")
    return cached


def _assign(cfg: DataConfig, cache_dir: str | None) -> tuple[list, list[str]]:
    """(pretrain, probe_train, probe_test) parts and the probe's class names."""
    parts, classes, labeled = _open(cfg.source, "data.source", cfg, cache_dir)
    if cfg.eval_source is None:
        if len(parts) == 2:
            return [parts[0], parts[0], parts[1]], classes
        if labeled:
            pretrain, test = _split(parts[0], cfg)
            return [pretrain, pretrain, test], classes
        return [parts[0], None, None], classes
    pretrain = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    eparts, eclasses, elabeled = _open(cfg.eval_source, "data.eval_source", cfg, cache_dir)
    if not elabeled:
        raise ConfigError(f"data.eval_source: {cfg.eval_source} is unlabeled; the held-out "
                          f"source must carry labels")
    if labeled:
        test = eparts[0] if len(eparts) == 1 else eparts[0].union(eparts[1])
        return [pretrain, pretrain, test], eclasses
    probe_train, test = eparts if len(eparts) == 2 else _split(eparts[0], cfg)
    return [pretrain, probe_train, test], eclasses


def list_sources(cfg: DataConfig, cache_dir: str) -> list[str]:
    """List the file sources into `cache_dir` (once for a sweep's trials); the probe's classes."""
    return _assign(cfg, cache_dir)[1]


def load_splits(cfg: DataConfig, need_labels: bool, *, cache_dir: str | None = None,
                log: Callable[[str], None] = lambda line: None) -> Splits:
    """Build the pretraining and probe datasets described by `cfg` (Ray must be initialised).

    `cache_dir`: where the listing of a file source is stored and read back (a run's data/).
    """
    (pretrain, probe_train, probe_test), classes = _assign(cfg, cache_dir)
    if need_labels and probe_test is None:
        raise ConfigError(f"eval.stages: {cfg.source} is unlabeled; give data.eval_source (a "
                          f"labeled source) or set eval.stages=[]")
    parts = [p for p in (pretrain, probe_train, probe_test) if p is not None]
    files = any(p.kind != "embedded" for p in parts)
    skip_log = ray.remote(num_cpus=0)(readers.SkipLog).remote() if files else None
    cached = _use_cache(cfg, list({id(p): p for p in parts}.values()), log)
    # pretraining images at decode_size (the views crop them); the probes see whole images at
    # the training size, as the evaluation stages feed them to `embed`
    datasets: dict[tuple, ray.data.Dataset] = {}
    for p, size in ((pretrain, cfg.decoded_size), (probe_train, cfg.image_size),
                    (probe_test, cfg.image_size)):
        if p is not None and (id(p), size) not in datasets:
            ds = _read(p, cfg, size, shuffle=False, skip_log=skip_log)
            datasets[id(p), size] = ds.materialize() if cached or p.kind == "embedded" else ds
    train_ds = datasets[id(pretrain), cfg.decoded_size]
    streamed = not cached and pretrain.kind != "embedded"
    if streamed:
        train_ds = _read(pretrain, cfg, cfg.decoded_size, shuffle=True, skip_log=skip_log)
    probes = [None if p is None else datasets[id(p), cfg.image_size]
              for p in (probe_train, probe_test)]
    counts = {"pretrain": pretrain.rows.num_rows}
    if probe_test is not None:
        counts.update(probe_train=probe_train.rows.num_rows, probe_test=probe_test.rows.num_rows)
    splits = Splits(train_ds, *probes, classes, counts, streamed=streamed,
                    data_id=_digest([probe_train, probe_test], cfg.image_size),
                    skip_log=skip_log)
    if not streamed and files:  # decoded once: the bad images are known now
        splits.known_skipped = splits.skipped
        counts["pretrain"] = train_ds.count()
        if probe_test is not None:
            counts.update(probe_train=probes[0].count(), probe_test=probes[1].count())
    counts["skipped"] = len(splits.known_skipped)
    return splits
