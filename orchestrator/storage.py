"""Where a run is written, and whether every Ray node sees that place.

Ray Train workers write checkpoints and rank 0 writes TensorBoard events and metrics.jsonl into
the run folder from whatever machine they run on, and a resumed run reads them back from the
driver's machine. So a run on Ray nodes that span several machines needs a storage path that all
of them mount at the same place. What can be told from here:

- the Ray nodes' host addresses (`ray.nodes()`): nodes on one machine share its disk;
- the filesystem type of the path (/proc/mounts): NFS, Lustre, GPFS, CephFS, SMB and FUSE bucket
  mounts are shared by construction;
- what the user asserts with `cluster.shared_storage` (true: every node mounts it, e.g. a
  filesystem type not listed here; false: it is node-local even if it looks shared).

A node-local path on a multi-machine cluster is an error that says why, raised once Ray is
joined and before any data or training task starts.
"""
from __future__ import annotations

import os

from methods.config import ConfigError
from pipelines.uri import is_uri

# Filesystem types that every node of a cluster can mount at the same path.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "ceph", "cifs", "smb3", "smbfs",
                      "glusterfs", "beegfs", "wekafs", "panfs"}
SHARED_FUSE = ("s3fs", "gcsfuse", "mountpoint-s3", "juicefs", "glusterfs", "ceph", "sshfs",
               "blobfuse", "goofys", "rclone", "alluxio")


def check_storage_path(storage_path: str | None, prefix: str = "cluster") -> None:
    """Static check, before Ray starts: the run folder is written with local file I/O."""
    if storage_path is not None and is_uri(storage_path):
        raise ConfigError(
            f"{prefix}.storage_path: {storage_path} is a URI, but selfsup writes run folders "
            f"(config, metrics.jsonl, TensorBoard events, reports) with local file I/O, so URIs "
            f"are not supported yet; mount the bucket or share on every node (s3fs, gcsfuse, "
            f"mountpoint-s3, NFS) and give that mount path")


def mount_of(path: str, mounts_file: str = "/proc/mounts") -> tuple[str, str] | None:
    """(mount point, filesystem type) holding `path` (or its nearest existing parent), if known."""
    try:
        with open(mounts_file) as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None  # not Linux: the filesystem type is unknown
    path = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    best = None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def is_shared_filesystem(fstype: str) -> bool:
    if fstype in SHARED_FILESYSTEMS:
        return True
    return fstype.startswith("fuse.") and fstype[5:].startswith(SHARED_FUSE)


def check_shared(storage_path: str | None, shared_storage: bool | None, hosts: set[str],
                 mounts_file: str = "/proc/mounts", prefix: str = "cluster") -> None:
    """Raise ConfigError if Ray nodes on several machines would each write to their own disk.

    `hosts`: the addresses of the cluster's alive nodes. `shared_storage`: the user's assertion
    (None: decide from the filesystem type).
    """
    if len(hosts) <= 1 or shared_storage is True:
        return
    machines = f"{len(hosts)} machines ({', '.join(sorted(hosts))})"
    fix = (f"use a path every node mounts at the same place (NFS, Lustre, a Kubernetes PVC), "
           f"set {prefix}.shared_storage=true if it is one, or keep the run on one machine")
    if storage_path is None:
        raise ConfigError(
            f"{prefix}.storage_path: not set, so the run goes to output.dir on the driver's "
            f"disk, but the Ray cluster has nodes on {machines}; workers elsewhere would write "
            f"checkpoints to their own disks and a resume would not find them; {fix}")
    mount = mount_of(storage_path, mounts_file)
    if shared_storage is None and mount and is_shared_filesystem(mount[1]):
        return
    if shared_storage is False:
        where = f"node-local ({prefix}.shared_storage=false)"
    elif mount:
        where = f"on a {mount[1]} filesystem mounted at {mount[0]}"
    else:
        where = "on a filesystem of unknown type"
    raise ConfigError(
        f"{prefix}.storage_path: {storage_path} is {where}, which is not shared between "
        f"machines, but the Ray cluster has nodes on {machines}; workers there would write "
        f"checkpoints and TensorBoard events to their own disks and a resume would not find "
        f"them; {fix}")


def alive_hosts() -> set[str]:
    """Host addresses of the joined Ray cluster's alive nodes."""
    import ray
    return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
