"""The full listing of a file source: one row per image, made by Ray tasks, never any pixels.

A listing is an Arrow table with `key` (the image's name, the same on every machine), `label`
(index into the sorted class names; -1 unlabeled) and where to read the image: `path` (folder),
`file` + `row_group` + `row` (Parquet) or `shard` (WebDataset). Folders are walked by class
sub-folder, Parquet footers and label columns and tar headers are read file by file, in parallel:
in Ray tasks for object storage (each its own connections, spread over the cluster), in threads
of the driver for a local or mounted filesystem (directory reads are syscalls that threads overlap,
and a task would first start a worker process); the driver only concatenates their tables. A run stores its listing beside its outputs
(`<run>/data/`) and reads it back on a resume, and a sweep lists once for all its trials, so the
split of a run never changes under it (delete the file to list again).

The held-out split is a function of each key alone (`held_out`): a seeded hash in [0, 1) below
`test_fraction`. It needs no sort and no other key, is the same on every machine and for every
listing order, and adding images never moves an existing image between the splits. Each class is
split with the same probability, so the split is stratified in expectation (a class of n images
holds out fraction * n +- sqrt(fraction * (1 - fraction) * n)).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from methods.config import ConfigError
from pipelines import uri
from pipelines.sources import (IMAGE_EXTENSIONS, WDS_LABEL, SourceInfo, data_files,
                               is_image_name, wds_member)

VERSION = 1
MAX_TASKS = 64  # listing tasks per source: enough to overlap storage latency, few to schedule
LOCAL_THREADS = 8


@dataclass
class Listing:
    kind: str            # folder | parquet | webdataset
    location: str
    classes: list[str]
    table: pa.Table      # key, label (+ where to read each image)

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


def held_out(keys, fraction: float, seed: int) -> np.ndarray:
    """bool (N,): the keys in the held-out split; blake2b of "seed:key" read as a number in [0, 1)."""
    u = np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8)
                                    .digest(), "little") for k in keys), dtype=np.uint64)
    return u < np.uint64(int(fraction * 2.0**64))


def list_source(info: SourceInfo, endpoint_url: str | None, *, image_column: str = "image",
                label_column: str = "label", key: str = "data.source",
                cache: str | None = None) -> Listing:
    """The listing of a folder, Parquet or WebDataset source (Ray must be initialised).

    `cache`: a file to read the listing from if it was made for this location, else to write it to.
    """
    if cache:
        stored = _read_cache(cache, info)
        if stored is not None:
            return stored
    if info.kind == "folder":
        listing = _list_folder(info, endpoint_url, key)
    elif info.kind == "parquet":
        listing = _list_parquet(info, endpoint_url, image_column, label_column, key)
    else:
        listing = _list_webdataset(info, endpoint_url, key)
    if listing.table.num_rows == 0:
        raise ConfigError(f"{key}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in "
                          f"{info.location}")
    if cache:
        _write_cache(cache, listing)
    return listing


# ---------------------------------------------------------------- running tasks

def _chunks(items: list, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


def _in_parallel(fn, items: list, location: str, *args) -> pa.Table:
    """`fn(chunk, location, *args) -> pa.Table` over chunks of `items`, concatenated: in Ray tasks
    for a URI, in threads for a local path."""
    if uri.is_uri(location):
        import ray
        remote = ray.remote(num_cpus=0.5, max_retries=3)(fn)
        tables = ray.get([remote.remote(chunk, location, *args)
                          for chunk in _chunks(items, MAX_TASKS)])
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(LOCAL_THREADS) as pool:
            tables = list(pool.map(lambda chunk: fn(chunk, location, *args),
                                   _chunks(items, MAX_TASKS)))
    return pa.concat_tables(tables)


def _labels_to_index(raw: pa.ChunkedArray) -> tuple[pa.Array, list[str]]:
    """Raw label values (ints or strings, nulls allowed) -> int64 indices into sorted classes."""
    import pyarrow.compute as pc
    values = [v for v in pc.unique(raw).to_pylist() if v is not None]
    values.sort()
    index = pc.index_in(raw, value_set=pa.array(values, type=raw.type))
    return pc.fill_null(index, -1).cast(pa.int64()), [str(v) for v in values]


# ---------------------------------------------------------------- folders

def _walk_local(root: str) -> list[str]:
    """Image files under `root` (its sub-folders too, not following links to folders), sorted."""
    found, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith("."):
                        stack.append(e.path)
                elif is_image_name(e.name) and e.is_file():
                    found.append(e.path)
    return found


def _walk(fs, path: str) -> list[str]:
    import pyarrow.fs as pafs
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(path)
    return [e.path for e in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if e.type == pafs.FileType.File and is_image_name(e.base_name)]


def _folder_task(dirs: list[tuple[str, int]], location: str, endpoint_url: str | None,
                 recursive: bool) -> pa.Table:
    fs, root = uri.filesystem(location, endpoint_url)
    paths, labels = [], []
    for folder, label in dirs:
        if recursive:
            found = _walk(fs, folder)
        else:
            import pyarrow.fs as pafs
            found = [e.path for e in fs.get_file_info(pafs.FileSelector(folder))
                     if e.type == pafs.FileType.File and is_image_name(e.base_name)]
        paths += found
        labels += [label] * len(found)
    keys = [uri.relative(p, root) for p in paths]
    return pa.table({"key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64()),
                     "path": pa.array(paths, pa.string())})


def _list_folder(info: SourceInfo, endpoint_url: str | None, key: str) -> Listing:
    fs, root = uri.filesystem(info.location, endpoint_url)
    if not info.labeled:
        table = _in_parallel(_folder_task, [(root, -1)], info.location, endpoint_url, False)
    else:
        sep = "/" if uri.is_uri(info.location) else os.sep
        dirs = [(f"{root.rstrip(sep)}{sep}{c}", i) for i, c in enumerate(info.classes)]
        table = _in_parallel(_folder_task, dirs, info.location, endpoint_url, True)
    return Listing("folder", info.location, list(info.classes), table)


# ---------------------------------------------------------------- Parquet

def _parquet_task(files: list[str], location: str, endpoint_url: str | None,
                  label_column: str | None) -> pa.Table:
    import pyarrow.parquet as pq
    fs, root = uri.filesystem(location, endpoint_url)
    columns: dict[str, list] = {"key": [], "file": [], "row_group": [], "row": []}
    labels = []
    for path in files:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            rel, start = uri.relative(path, root) or os.path.basename(path), 0
            for group in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                columns["key"] += [f"{rel}#{start + i}" for i in range(n)]
                columns["file"] += [path] * n
                columns["row_group"] += [group] * n
                columns["row"] += list(range(n))
                start += n
            if label_column:
                labels.append(pf.read(columns=[label_column]).column(0))
    table = pa.table({"key": pa.array(columns["key"], pa.string()),
                      "file": pa.array(columns["file"], pa.string()),
                      "row_group": pa.array(columns["row_group"], pa.int32()),
                      "row": pa.array(columns["row"], pa.int32())})
    if label_column:
        raw = pa.chunked_array([c for col in labels for c in col.chunks],
                               type=labels[0].type if labels else pa.null())
        table = table.append_column("raw_label", raw.combine_chunks())
    return table


def _list_parquet(info: SourceInfo, endpoint_url: str | None, image_column: str,
                  label_column: str, key: str) -> Listing:
    fs, root = uri.filesystem(info.location, endpoint_url)
    files = data_files(fs, root, info.location, key, ".parquet")
    table = _in_parallel(_parquet_task, files, info.location, endpoint_url,
                      label_column if info.labeled else None)
    return _with_labels(table, "parquet", info.location)


def _with_labels(table: pa.Table, kind: str, location: str) -> Listing:
    """Replace the raw label column (if any) by class indices."""
    if "raw_label" not in table.column_names:
        return Listing(kind, location, [], table.append_column(
            "label", pa.array(np.full(table.num_rows, -1, np.int64))))
    index, classes = _labels_to_index(table.column("raw_label"))
    table = table.drop_columns(["raw_label"]).append_column("label", index)
    return Listing(kind, location, classes, table)


# ---------------------------------------------------------------- WebDataset

def _wds_task(shards: list[str], location: str, endpoint_url: str | None) -> pa.Table:
    """Sample keys and labels of each shard from its tar headers (member data is skipped by
    seeking, except the small label members)."""
    fs, root = uri.filesystem(location, endpoint_url)
    keys, samples_col, shard_col, labels = [], [], [], []
    for shard in shards:
        rel = uri.relative(shard, root) or os.path.basename(shard)
        samples: dict[str, Any] = {}
        with fs.open_input_file(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                sample, ext = wds_member(member.name)
                entry = samples.setdefault(sample, [False, None])
                if ext in {e.lstrip(".") for e in IMAGE_EXTENSIONS}:
                    entry[0] = True
                elif ext == WDS_LABEL:
                    entry[1] = tar.extractfile(member).read().decode().strip()
        for sample, (has_image, label) in samples.items():
            if has_image:
                keys.append(f"{rel}/{sample}")
                samples_col.append(sample)
                shard_col.append(shard)
                labels.append(None if label is None else int(label))
    return pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array(shard_col, pa.string()),
                     "sample": pa.array(samples_col, pa.string()),
                     "raw_label": pa.array(labels, pa.int64())})


def _list_webdataset(info: SourceInfo, endpoint_url: str | None, key: str) -> Listing:
    fs, root = uri.filesystem(info.location, endpoint_url)
    shards = data_files(fs, root, info.location, key, ".tar")
    table = _in_parallel(_wds_task, shards, info.location, endpoint_url)
    if not info.labeled:
        table = table.drop_columns(["raw_label"])
    return _with_labels(table, "webdataset", info.location)


# ---------------------------------------------------------------- the stored listing

def _read_cache(path: str, info: SourceInfo) -> Listing | None:
    import pyarrow.parquet as pq
    if not os.path.exists(path):
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"selfsup_listing"])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None  # unreadable: list again
    if meta.get("version") != VERSION or meta.get("location") != info.location \
            or meta.get("kind") != info.kind:
        return None
    return Listing(info.kind, info.location, meta["classes"],
                   table.replace_schema_metadata(None))


def _write_cache(path: str, listing: Listing) -> None:
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {"version": VERSION, "kind": listing.kind, "location": listing.location,
            "classes": listing.classes}
    table = listing.table.replace_schema_metadata({"selfsup_listing": json.dumps(meta)})
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a listing interrupted half way is never read back
