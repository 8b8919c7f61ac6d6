"""The `pretext` stage: a checkpoint's own task on the held-out split, deterministic and exact."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import methods
from methods.backbones import BackboneConfig
from methods.config import to_dict
from pipelines import checkpoint as ckpt
from pipelines.stages import STAGES, EvalConfig, StageContext
from pipelines.stages.pretext import pretext_scores

pytestmark = pytest.mark.ray

SIZE, ROWS = 16, 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; on a shared machine idle threads spin
    yield
    torch.set_num_threads(before)


def _save(path: str, name: str, **method) -> str:
    spec = methods.get(name)
    cfg, backbone = spec.config(**method), BackboneConfig(width=4)
    torch.manual_seed(0)
    model = spec.model(cfg, backbone, SIZE)
    ckpt.save(path, model, None, step=0, epoch=0,
              build_info={"method": {"name": name, **to_dict(cfg)},
                          "backbone": to_dict(backbone), "image_size": SIZE})
    return path


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    d = load_digits()
    gray = (d.images[:ROWS] * 255 / 16).round().astype(np.uint8)  # (N, 8, 8)
    images = np.repeat(np.repeat(np.repeat(gray[..., None], 3, 3), 2, 1), 2, 2)  # (N, 16, 16, 3)
    return [{"image": images[i], "label": int(d.target[i]), "key": f"digits/{i:06d}"}
            for i in range(ROWS)]


def _context(tmp_path, checkpoint: str, probe_test, batch_size: int = 16) -> StageContext:
    return StageContext(run_dir=str(tmp_path), checkpoint=checkpoint,
                        splits=SimpleNamespace(probe_test=probe_test),
                        cfg=EvalConfig(stages=["pretext"], batch_size=batch_size), seed=7)


def test_pretext_stage_is_the_weighted_mean_over_key_ordered_batches(ray_session, tmp_path, rows):
    path = _save(str(tmp_path / "ckpt"), "rotnet")
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(ROWS)]
    ds = ray_session.data.from_items(shuffled, override_num_blocks=4)
    metrics = STAGES["pretext"].run(_context(tmp_path, path, ds))
    assert metrics["n_images"] == ROWS and set(metrics) == {"rotation_acc", "n_images"}
    # naive reference: rows by key, batches of 16, 16, 8, one generator seeded with ctx.seed
    model, meta = ckpt.load_model(path)
    views = methods.get("rotnet").views(methods.get("rotnet").config(**{
        k: v for k, v in meta["method"].items() if k != "name"}), SIZE)
    g = torch.Generator().manual_seed(7)
    correct = 0
    for start in range(0, ROWS, 16):
        images = torch.from_numpy(np.stack([r["image"] for r in rows[start:start + 16]]))
        batch = views(images.permute(0, 3, 1, 2).contiguous(), g)
        with torch.no_grad():
            logits, labels = model.logits(batch)
        correct += int((logits.argmax(1) == labels).sum())
    assert metrics["rotation_acc"] == pytest.approx(correct / (4 * ROWS), abs=1e-9)
    in_order = ray_session.data.from_items(rows, override_num_blocks=2)
    again = STAGES["pretext"].run(_context(tmp_path, path, in_order))
    assert again == metrics, "the block order must not change the number"


def test_pretext_stage_reports_reconstruction_error_for_inpainting(ray_session, tmp_path, rows):
    path = _save(str(tmp_path / "ckpt"), "inpainting", adv_weight=0.0)
    ds = ray_session.data.from_items(rows[:20])
    metrics = STAGES["pretext"].run(_context(tmp_path, path, ds, batch_size=8))
    assert metrics["n_images"] == 20
    assert 0 < metrics["masked_mse"] <= metrics["masked_l1"] <= 1


def test_pretext_stage_notes_methods_without_a_pretext_task(tmp_path):
    path = _save(str(tmp_path / "ckpt"), "simclr")
    metrics = STAGES["pretext"].run(_context(tmp_path, path, probe_test=None))
    assert set(metrics) == {"note"} and "simclr" in metrics["note"]
    assert not STAGES["pretext"].needs_labels


def test_pretext_scores_weight_each_batch_by_its_size():
    class Mean(torch.nn.Module):
        def pretext_metrics(self, batch):
            return {"mean": float(batch["x"].float().mean())}

    batches = [np.full((3, 2, 2, 3), 1, np.uint8), np.full((1, 2, 2, 3), 5, np.uint8)]
    scores, count = pretext_scores(Mean(), lambda x, g: {"x": x}, batches, seed=0)
    assert count == 4 and scores == {"mean": pytest.approx((3 * 1 + 1 * 5) / 4)}
