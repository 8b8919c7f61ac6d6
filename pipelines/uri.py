"""Where data lives: local paths and `file://`, `s3://`, `gs://` URIs, as pyarrow filesystems.

A source names a location; `filesystem(location, endpoint_url)` turns it into a pyarrow
`FileSystem` and a path inside it, which Ray tasks open on whatever node they run on. Credentials
are never part of a location or of selfsup's config: pyarrow reads them the way the cloud SDKs do
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE or an instance role;
GOOGLE_APPLICATION_CREDENTIALS or the metadata server), in each process that opens a file, so
they are never pickled into a task and never printed. An S3-compatible server (MinIO, Ceph) is
`data.endpoint_url` (or the AWS_ENDPOINT_URL variable the AWS tools read).
"""
from __future__ import annotations

import functools
import os
import re
from urllib.parse import urlparse

from methods.config import ConfigError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
SCHEMES = ("file", "s3", "gs")


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def normalize(location: str, key: str) -> str:
    """A local path made absolute (`~` expanded), `file://` made a path; other URIs checked."""
    if not is_uri(location):
        return os.path.abspath(os.path.expanduser(location))
    scheme = location.split("://", 1)[0].lower()
    if scheme == "file":
        return os.path.abspath(urlparse(location).path)
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}: {location!r} has the scheme {scheme}://, which selfsup cannot "
                          f"read; use a local path, file://, s3:// or gs://")
    if not location.split("://", 1)[1].strip("/"):
        raise ConfigError(f"{key}: {location!r} names no bucket; use {scheme}://BUCKET/PREFIX")
    return location.rstrip("/")


@functools.lru_cache(maxsize=8)
def _open(scheme: str, endpoint_url: str | None):
    import pyarrow.fs as pafs
    if scheme == "s3":
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint_url:
            parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    if scheme == "gs":
        return pafs.GcsFileSystem()
    return pafs.LocalFileSystem()


def filesystem(location: str, endpoint_url: str | None = None):
    """(pyarrow FileSystem, path inside it) for a normalised location."""
    if not is_uri(location):
        return _open("file", None), location
    scheme, rest = location.split("://", 1)
    return _open(scheme.lower(), endpoint_url), rest


def join(location: str, *parts: str) -> str:
    """A child of a location, with `/` for URIs and the OS separator for paths."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return os.path.join(location, *parts)


def relative(location: str, root: str) -> str:
    """`location` relative to `root`, with `/` separators (a key that is the same on every OS)."""
    rel = location[len(root):].lstrip("/\\") if location.startswith(root) else location
    return rel.replace(os.sep, "/")
