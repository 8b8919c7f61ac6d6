"""Evaluation stages on known answers, without Ray: numpy/torch inputs straight into each stage's
function, and the runner's skip-if-unchanged logic on stand-in stages."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipelines.stages import STAGES, EvalConfig, StageContext, run_stages
from pipelines.stages.cluster import cluster_scores
from pipelines.stages.config import FinetuneConfig, KMeansConfig, LinearConfig, TSNEConfig
from pipelines.stages.corruptions import LEVELS, corrupt
from pipelines.stages.efficiency import count_parameters, inference_throughput
from methods.base import SSLMethod
from pipelines.stages.finetune import accuracy as finetune_accuracy, finetune
from pipelines.stages.knn import knn_predict, knn_top1
from pipelines.stages.linear import (accuracy as probe_accuracy, fit_linear, linear_probe,
                                     probe_from_state, stratified_folds, validation_splits)
from pipelines.stages.lowshot import stratified_subset, tag
from pipelines.stages.registry import Stage
from pipelines.stages.robustness import robustness_metrics
from pipelines.stages.tsne import project_2d, scatter_png


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra BLAS/OpenMP threads only spin and wait."""
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def separable(n_per_class: int, classes: int, dim: int, seed: int):
    """Features where class c sits on its own axis (plus small noise): perfectly separable."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = 0.05 * rng.normal(size=(len(y), dim)).astype(np.float32)
    x[np.arange(len(y)), y] += 1.0
    return x, y.astype(np.int64)


def random_features(n: int, classes: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)


# kNN ---------------------------------------------------------------------------------------------

def naive_knn(train_x, train_y, test_x, k, temperature, classes):
    """Loop reference: cosine similarity, k nearest, votes weighted by exp(sim / T)."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    preds = []
    for q in test_x / np.linalg.norm(test_x, axis=1, keepdims=True):
        sims = [float(q @ t) for t in tr]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * classes
        for i in nearest:
            votes[train_y[i]] += np.exp(sims[i] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_knn_matches_loop_reference():
    xtr, ytr = random_features(60, 4, 8, seed=1)
    xte, _ = random_features(25, 4, 8, seed=2)
    got = knn_predict(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), 7, 0.1,
                      4, chunk=10)
    np.testing.assert_array_equal(got.numpy(), naive_knn(xtr, ytr, xte, 7, 0.1, 4))


def test_knn_is_perfect_on_separable_and_chance_on_random_features():
    assert knn_top1(separable(30, 5, 8, 0), separable(20, 5, 8, 1), k=20, temperature=0.07) == 1.0
    acc = knn_top1(random_features(600, 5, 16, 0), random_features(600, 5, 16, 1), k=20,
                   temperature=0.07)
    assert abs(acc - 0.2) < 0.07


# linear probe ------------------------------------------------------------------------------------

SMALL_LINEAR = LinearConfig(epochs=10, lrs=[0.1, 0.01], batch_size=128, val_fraction=0.2)


def test_linear_probe_is_perfect_on_separable_and_chance_on_random_features():
    metrics, _ = linear_probe(separable(30, 5, 8, 0), separable(20, 5, 8, 1), SMALL_LINEAR)
    assert metrics["top1"] == 1.0 and metrics["val_top1"] > 0.95 and metrics["folds"] == 5
    metrics, _ = linear_probe(random_features(400, 5, 16, 0), random_features(600, 5, 16, 1),
                              SMALL_LINEAR)
    assert abs(metrics["top1"] - 0.2) < 0.07


def test_folds_hold_every_training_feature_once_with_classes_spread_evenly():
    labels = np.repeat(np.arange(4), [23, 10, 7, 1])
    folds = stratified_folds(labels, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    for c in range(4):
        counts = [int((labels[f] == c).sum()) for f in folds]
        assert max(counts) - min(counts) <= 1, (c, counts)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1  # 41 images: 9, 8, 8, 8, 8
    again = stratified_folds(labels, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    for fit, val in validation_splits(labels, LinearConfig(folds=5), seed=3):
        assert not set(fit) & set(val) and len(fit) + len(val) == len(labels)
    (fit, val), = validation_splits(labels, LinearConfig(folds=1, val_fraction=0.2), seed=3)
    assert len(val) == round(23 * 0.2) + round(10 * 0.2) + round(7 * 0.2)  # a lone image: fit


def test_probe_picks_the_grid_point_with_the_best_cross_validated_accuracy():
    x, y = random_features(120, 3, 6, 0)
    x[:, 0] += y * 0.8  # weakly separable: the grid points score differently
    cfg = LinearConfig(epochs=3, lrs=[0.5, 0.001], weight_decays=[0.0, 0.3], batch_size=64, folds=3)
    metrics, _ = linear_probe((x, y), (x, y), cfg, seed=1)
    naive = {}
    for lr in cfg.lrs:
        for wd in cfg.weight_decays:
            accs = []
            for fit, val in validation_splits(y, cfg, seed=1):
                probe = fit_linear(x[fit], y[fit], 3, lr, wd, cfg, seed=1)
                accs.append(probe_accuracy(probe, x[val], y[val]))
            naive[lr, wd] = sum(accs) / len(accs)
    best = max(naive.values())
    assert metrics["val_top1"] == pytest.approx(best)
    assert naive[metrics["best_lr"], metrics["best_weight_decay"]] == pytest.approx(best)
    assert len(set(round(v, 6) for v in naive.values())) > 1  # the choice was not a tie of all


def test_saved_probe_reloads_with_the_same_predictions():
    x, y = separable(10, 3, 6, 0)
    _, probe = linear_probe((x, y), (x, y), LinearConfig(epochs=5, lrs=[0.1]))
    again = probe_from_state(probe.state_dict())
    xt = torch.from_numpy(x)
    torch.testing.assert_close(again(xt), probe(xt))


# clustering --------------------------------------------------------------------------------------

def test_nmi_and_ari_are_one_on_well_separated_clusters_and_near_zero_on_noise():
    x, y = separable(40, 6, 10, 0)
    scores = cluster_scores(x, y, KMeansConfig(n_init=4), seed=0)
    assert scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)
    assert scores["k"] == 6
    x, y = random_features(600, 6, 10, 0)
    scores = cluster_scores(x, y, KMeansConfig(n_init=2), seed=0)
    assert scores["nmi"] < 0.05 and abs(scores["ari"]) < 0.05


# low-shot subsets --------------------------------------------------------------------------------

def test_lowshot_subsets_are_stratified_reproducible_and_never_leave_a_class_out():
    labels = np.repeat(np.arange(4), [200, 100, 50, 3])
    subset = stratified_subset(labels, 0.1, seed=3)
    counts = np.bincount(labels[subset], minlength=4)
    np.testing.assert_array_equal(counts, [20, 10, 5, 1])   # round(0.1 n), at least one
    np.testing.assert_array_equal(subset, stratified_subset(labels, 0.1, seed=3))
    assert not np.array_equal(subset, stratified_subset(labels, 0.1, seed=4))
    assert len(np.unique(subset)) == len(subset)
    np.testing.assert_array_equal(np.bincount(labels[stratified_subset(labels, 0.01, 0)]),
                                  [2, 1, 1, 1])
    assert (tag(0.01), tag(0.1), tag(0.005)) == ("1pct", "10pct", "0.5pct")


# fine-tuning -------------------------------------------------------------------------------------

class TinyMethod(SSLMethod):
    """A method with the base class's features/embed hooks."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())


def coloured_images(n_per_class: int, seed: int):
    """Class c is a noisy image dominated by colour channel c: learnable from pixels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    x = rng.integers(0, 60, (len(y), 8, 8, 3))
    x[np.arange(len(y)), :, :, y] += 180
    return x.astype(np.uint8), y.astype(np.int64)


def test_finetuning_trains_the_encoder_through_its_features_hook():
    torch.manual_seed(0)
    model = TinyMethod()
    before = [p.detach().clone() for p in model.backbone.parameters()]
    assert not model.embed(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).requires_grad
    assert model.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).requires_grad
    (xtr, ytr), (xte, yte) = coloured_images(20, 0), coloured_images(10, 1)
    cfg = FinetuneConfig(epochs=1, min_steps=60, lr=0.01, head_lr=0.05, batch_size=16)
    head, losses = finetune(model, xtr, ytr, 3, cfg, seed=0)
    assert len(losses) == 20 and losses[-1] < losses[0]   # min_steps forces 60 steps = 20 epochs
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert finetune_accuracy(model, head, xte, yte) == 1.0


def test_features_without_a_gradient_path_cannot_be_fine_tuned():
    model = TinyMethod()
    model.features = lambda images: torch.ones(len(images), 2)
    images, labels = coloured_images(2, 0)
    with pytest.raises(TypeError, match="features gives no gradient"):
        finetune(model, images, labels, 3, FinetuneConfig(), seed=0)


# robustness --------------------------------------------------------------------------------------

def digit_like_images() -> np.ndarray:
    from sklearn.datasets import load_digits
    digits = load_digits().images[:16]                                  # (16, 8, 8) in 0..16
    big = np.kron(digits, np.ones((4, 4))) * 255 / 16                   # (16, 32, 32)
    return np.repeat(big[..., None], 3, axis=3).astype(np.uint8)       # (16, 32, 32, 3)


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_corruptions_leave_severity_zero_unchanged_and_degrade_monotonically(name):
    images = digit_like_images()
    seeds = np.arange(len(images)) + 100
    np.testing.assert_array_equal(corrupt(images, name, 0, seeds), images)
    errors = []
    for severity in (1, 2, 3):
        out = corrupt(images, name, severity, seeds)
        assert out.dtype == np.uint8 and out.shape == images.shape
        errors.append(float(np.mean((out.astype(float) - images) ** 2)))
    assert 0 < errors[0] < errors[1] < errors[2], errors


def test_noise_is_reproducible_per_image_whatever_the_batch():
    images = digit_like_images()
    seeds = np.arange(len(images))
    whole = corrupt(images, "gaussian_noise", 2, seeds)
    np.testing.assert_array_equal(corrupt(images[5:9], "gaussian_noise", 2, seeds[5:9]), whole[5:9])


def test_jpeg_corruption_is_a_real_jpeg_round_trip():
    images = digit_like_images()[:1]
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="JPEG", quality=LEVELS["jpeg"][2])
    np.testing.assert_array_equal(corrupt(images, "jpeg", 3)[0],
                                  np.asarray(Image.open(io.BytesIO(buf.getvalue()))))


def test_relative_drop_from_clean():
    m = robustness_metrics({"blur": [0.8, 0.4, 0.2, 0.0], "noise": [0.8, 0.8, 0.8, 0.8]}, [1, 2, 3])
    assert m["clean_top1"] == 0.8 and m["blur_s2"] == 0.2
    assert m["blur_drop"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    assert m["noise_drop"] == 0.0 and m["mean_drop"] == pytest.approx(0.375)
    assert m["corrupt_top1"] == pytest.approx((0.4 + 0.2 + 0.0 + 3 * 0.8) / 6)


# efficiency --------------------------------------------------------------------------------------

def test_parameters_are_counted_exactly_including_frozen_ones():
    net = nn.Sequential(nn.Linear(3, 4), nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5))
    net[1].requires_grad_(False)
    assert count_parameters(net) == (3 * 4 + 4) + (2 * 5 * 9 + 5) + (5 + 5)


def test_inference_throughput_times_embed():
    model = TinyMethod().eval()
    calls = []
    model.embed = lambda images: calls.append(images.shape) or torch.zeros(len(images), 4)
    ips = inference_throughput(model, image_size=8, batch_size=4, batches=3)
    assert ips > 0 and calls == [(4, 3, 8, 8)] * 4   # one warm-up and three timed batches


# t-SNE -------------------------------------------------------------------------------------------

def test_tsne_map_or_pca_above_the_limit_and_a_png_plot(tmp_path):
    x, y = separable(15, 3, 6, 0)
    coords, method = project_2d(x, TSNEConfig(perplexity=5, max_points=100), seed=0)
    assert method == "tsne" and coords.shape == (45, 2)
    coords, method = project_2d(x, TSNEConfig(max_points=20), seed=0)
    assert method == "pca" and coords.shape == (45, 2)
    scatter_png(coords, y, ["a", "b", "c"], "map", str(tmp_path / "map.png"))
    with Image.open(tmp_path / "map.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


# the runner: requirements, fingerprints, skipping ------------------------------------------------

@pytest.fixture
def fake_stages(monkeypatch):
    """Stand-in stages `a` <- `b` (b requires a, reads eval.knn) that count their runs."""
    runs = {"a": 0, "b": 0}

    def run_a(ctx):
        runs["a"] += 1
        ctx.outputs["a"] = 41
        with open(os.path.join(ctx.stage_dir("a"), "value.json"), "w") as f:
            json.dump(41, f)
        return {"value": 41.0}

    def load_a(ctx):
        with open(os.path.join(ctx.stage_dir("a"), "value.json")) as f:
            return json.load(f)

    def run_b(ctx):
        runs["b"] += 1
        return {"value": float(ctx.output("a") + ctx.cfg.knn.k[0])}

    monkeypatch.setitem(STAGES, "a", Stage("a", run_a, load=load_a))
    monkeypatch.setitem(STAGES, "b", Stage("b", run_b, requires=("a",), config=("knn",)))
    return runs


def fake_checkpoint(path, content: bytes = b"weights", step: int = 3) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.pt"), "wb") as f:
        f.write(content)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": step}, f)
    return str(path)


def ctx_for(tmp_path, checkpoint, k=1, data_id="digits-v1"):
    cfg = EvalConfig(stages=["b"])
    cfg.knn.k = [k]
    return StageContext(run_dir=str(tmp_path / "run"), checkpoint=checkpoint, splits=None, cfg=cfg,
                        data_id=data_id)


def test_unchanged_stages_are_skipped_and_their_outputs_reloaded(tmp_path, fake_stages):
    ck = fake_checkpoint(tmp_path / "ck")
    first = run_stages(ctx_for(tmp_path, ck), log=lambda s: None)
    assert first["b"]["value"] == 42.0 and fake_stages == {"a": 1, "b": 1}
    assert "a" not in first   # required, not requested
    lines = []
    ctx = ctx_for(tmp_path, ck)
    again = run_stages(ctx, log=lines.append)
    assert fake_stages == {"a": 1, "b": 1} and ctx.skipped == ["a", "b"]
    assert again == first and "unchanged" in lines[0]
    ctx = ctx_for(tmp_path, ck, k=5)          # b's config changed: b runs, a is re-used from disk
    assert run_stages(ctx, log=lambda s: None)["b"]["value"] == 46.0
    assert fake_stages == {"a": 1, "b": 2} and ctx.skipped == ["a"]


@pytest.mark.parametrize("change", ["checkpoint", "step", "data", "force"])
def test_stages_rerun_when_an_input_changes_or_forced(tmp_path, fake_stages, change):
    ck = fake_checkpoint(tmp_path / "ck")
    run_stages(ctx_for(tmp_path, ck), log=lambda s: None)
    if change == "checkpoint":
        fake_checkpoint(tmp_path / "ck", content=b"retrained")
    if change == "step":
        fake_checkpoint(tmp_path / "ck", step=4)
    ctx = ctx_for(tmp_path, ck, data_id="digits-v2" if change == "data" else "digits-v1")
    run_stages(ctx, log=lambda s: None, force=change == "force")
    assert fake_stages == {"a": 2, "b": 2} and ctx.skipped == []


def test_a_stage_interrupted_before_writing_its_fingerprint_runs_again(tmp_path, fake_stages):
    ck = fake_checkpoint(tmp_path / "ck")
    run_stages(ctx_for(tmp_path, ck), log=lambda s: None)
    os.remove(tmp_path / "run" / "stages" / "b" / "fingerprint.json")
    run_stages(ctx_for(tmp_path, ck), log=lambda s: None)
    assert fake_stages == {"a": 1, "b": 2}


def test_every_stage_is_registered_after_what_it_requires():
    from pipelines.stages.registry import ordered
    order = ordered(["robustness", "lowshot", "knn"])
    assert order.index("embed") < order.index("linear") < order.index("robustness")
    assert set(STAGES) >= {"embed", "knn", "linear", "finetune", "lowshot", "cluster", "tsne",
                           "robustness", "efficiency"}
