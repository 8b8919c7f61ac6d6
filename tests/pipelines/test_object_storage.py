"""Training from object storage: `folder:s3://...` and `parquet:s3://...` against an S3-compatible
server (moto's, started here on 127.0.0.1), credentials from the environment (tests/conftest.py)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.config import apply_overrides, from_dict
from tests.conftest import TINY

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, pyarrow S3FileSystem) of a moto S3 server on loopback with a bucket."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                           allow_bucket_creation=True)
    fs.create_dir("selfsup-test")
    yield f"http://{host}:{port}", fs
    server.stop()


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run(tmp_path, source: str, endpoint: str, stages: str) -> dict:
    from orchestrator.run import run_experiment
    d = apply_overrides({"method": {"name": "simclr"}},
                        TINY + [f"data.source={source}", f"data.endpoint_url={endpoint}",
                                "data.cache=none", "data.test_fraction=0.25",
                                "train.batch_size=16", f"eval.stages={stages}",
                                "eval.online_every=0", f"output.dir={tmp_path}", "output.name=r"])
    return run_experiment(from_dict(d), log=lambda line: None)


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_training_streams_from_s3(ray_session, tmp_path, s3, kind):
    endpoint, fs = s3
    rng = np.random.default_rng(0)
    images = {f"c{c}/{i:03d}.png": _png(rng) for c in range(2) for i in range(24)}
    if kind == "folder":
        for key, data in images.items():
            with fs.open_output_stream(f"selfsup-test/imgs/{key}") as f:
                f.write(data)
        with fs.open_output_stream("selfsup-test/imgs/c1/broken.png") as f:
            f.write(b"not an image")
        source = "folder:s3://selfsup-test/imgs"
    else:
        table = pa.Table.from_pandas(pd.DataFrame(
            {"image": list(images.values()) + [b"not an image"],
             "label": [k.split("/")[0] for k in images] + ["c1"]}))
        with fs.open_output_stream("selfsup-test/pq/part-0.parquet") as f:
            pq.write_table(table, f, row_group_size=10)
        source = "parquet:s3://selfsup-test/pq"
    # the probes read from the bucket too (kNN), once: the folder case
    summary = _run(tmp_path, source, endpoint, "[knn]" if kind == "folder" else "[]")
    data = summary["train"]["data"]
    assert data["pretrain"] + data["probe_test"] == 49  # listed: the broken image too
    assert summary["train"]["steps"] in (data["pretrain"] // 16, (data["pretrain"] - 1) // 16)
    if kind == "folder":
        assert 0.0 <= summary["eval"]["knn"]["top1"] <= 1.0
        assert summary["train"]["skipped_images"] == 1  # found unreadable while reading
    else:  # the broken row is skipped if training read it (a 1 in 4 chance it is held out)
        assert summary["train"]["skipped_images"] in (0, 1)
    assert (tmp_path / "r" / "data").is_dir()  # the listing, stored with the run
