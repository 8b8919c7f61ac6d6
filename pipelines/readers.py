"""Reading images inside Ray Data tasks: encoded bytes from a listing's rows, then decoding.

Every function here runs in a Ray Data task on whatever node Ray picks, and opens its storage
there (pipelines/uri.py), so a listing can be read from a local disk, a shared mount or a bucket.
Folder rows are read and decoded in one step; Parquet row groups and WebDataset shards are units
that yield their images in chunks, so a task never holds more than a chunk of decoded pixels.
Bad images are dropped where they are found and their keys sent to the run's `SkipLog`; with
`data.strict` the first one fails the task, naming the image.
"""
from __future__ import annotations

import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import ray

from pipelines import uri
from pipelines.decode import decode_batch
from pipelines.sources import IMAGE_EXTENSIONS, wds_member

READ_THREADS = 16  # object stores answer one small GET in tens of ms: overlap them
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


class SkipLog:
    """A Ray actor holding the keys of the images that could not be read or decoded."""

    def __init__(self):
        self.seen: set[str] = set()

    def add(self, keys: list[str]) -> None:
        self.seen.update(keys)

    def keys(self) -> list[str]:
        return sorted(self.seen)


def _keep_good(decoded: dict, skip_log) -> dict:
    """Drop the rows `decode_batch` marked bad; tell the skip log their keys."""
    ok = decoded.pop("ok")
    if not ok.all():
        if skip_log is not None:
            # waited for (only when a batch has bad images): a count read as soon as the
            # dataset is done must include them
            ray.get(skip_log.add.remote([str(k) for k in decoded["key"][~ok]]))
        decoded = {k: v[ok] for k, v in decoded.items()}
    return decoded


def _read_one(fs, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError:
        return b""  # unreadable: decode_batch counts it as bad


def read_files(batch: dict, *, location: str, endpoint_url: str | None, size: int, strict: bool,
               skip_log=None) -> dict:
    """Folder rows {"path", "key", "label"} -> {"image" (n, size, size, 3), "key", "label"}."""
    import pyarrow.fs as pafs
    fs, _ = uri.filesystem(location, endpoint_url)
    paths = [str(p) for p in batch["path"]]
    if isinstance(fs, pafs.LocalFileSystem):
        data = [_read_one(fs, p) for p in paths]
    else:
        with ThreadPoolExecutor(min(READ_THREADS, len(paths) or 1)) as pool:
            data = list(pool.map(lambda p: _read_one(fs, p), paths))
    decoded = decode_batch({"bytes": data, "key": batch["key"], "label": batch["label"]},
                           size=size, strict=strict)
    return _keep_good(decoded, skip_log)


def decode_rows(batch: dict, *, size: int, strict: bool, skip_log=None) -> dict:
    """Encoded rows {"bytes", "key", "label"} -> decoded rows; bad ones dropped and logged."""
    return _keep_good(decode_batch(batch, size=size, strict=strict), skip_log)


def _chunked(data: list, keys: list, labels: list, chunk: int, shuffle: bool) -> Iterator[dict]:
    order = np.random.permutation(len(keys)) if shuffle else np.arange(len(keys))
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        yield {"bytes": np.array([data[i] for i in idx], dtype=object),
               "key": np.array([keys[i] for i in idx]),
               "label": np.array([labels[i] for i in idx], dtype=np.int64)}


def _as_bytes(value) -> bytes:
    """An image cell: raw bytes, or a {"bytes": ...} struct (Hugging Face's Image feature)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return (value or {}).get("bytes") or b""


def read_parquet_units(batch: dict, *, location: str, endpoint_url: str | None,
                       image_column: str, chunk: int, shuffle: bool) -> Iterator[dict]:
    """Units {"file", "row_group", "rows", "keys", "labels"} -> encoded rows, `chunk` at a time
    (shuffled within the row group when `shuffle`)."""
    import pyarrow.parquet as pq
    fs, _ = uri.filesystem(location, endpoint_url)
    for i in range(len(batch["file"])):
        rows = np.asarray(batch["rows"][i], dtype=np.int64)
        with fs.open_input_file(str(batch["file"][i])) as f:
            column = pq.ParquetFile(f).read_row_group(int(batch["row_group"][i]),
                                                      columns=[image_column]).column(0)
        data = [_as_bytes(v) for v in column.take(rows).to_pylist()]
        yield from _chunked(data, list(batch["keys"][i]), list(batch["labels"][i]), chunk, shuffle)


def read_wds_units(batch: dict, *, location: str, endpoint_url: str | None, chunk: int,
                   shuffle: bool) -> Iterator[dict]:
    """Units {"shard", "samples", "keys", "labels"} -> encoded rows, `chunk` at a time.

    A shard is streamed once, front to back; the wanted samples' image members are kept until a
    chunk is full, so a task holds at most one chunk of encoded images.
    """
    fs, _ = uri.filesystem(location, endpoint_url)
    for i in range(len(batch["shard"])):
        wanted = dict(zip((str(s) for s in batch["samples"][i]),
                          zip((str(k) for k in batch["keys"][i]),
                              (int(v) for v in batch["labels"][i]))))
        data, keys, labels = [], [], []
        with fs.open_input_stream(str(batch["shard"][i])) as f, \
                tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                sample, ext = wds_member(member.name)
                if ext not in _IMAGE_EXTS or sample not in wanted or not member.isfile():
                    continue
                key, label = wanted.pop(sample)
                data.append(tar.extractfile(member).read())
                keys.append(key)
                labels.append(label)
                if len(keys) == chunk:
                    yield from _chunked(data, keys, labels, chunk, shuffle)
                    data, keys, labels = [], [], []
        for key, label in wanted.values():  # listed but gone or unreadable: counted as bad
            data.append(b"")
            keys.append(key)
            labels.append(label)
        if keys:
            yield from _chunked(data, keys, labels, chunk, shuffle)
