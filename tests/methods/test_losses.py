"""methods/losses.py against naive loop-based references, known answers and gradient checks."""
from __future__ import annotations

import math

import pytest
import torch

from methods.losses import (byol_loss, contrastive_batch_loss, dino_loss, dino_stats, info_nce,
                            mae_loss, nt_xent, patchify, unpatchify)

TEMPERATURES = [0.07, 0.2, 0.5, 1.0]


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _neg_log_softmax_at(logits: list[float], index: int) -> float:
    return -math.log(math.exp(logits[index]) / sum(math.exp(v) for v in logits))


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    views = z1.tolist() + z2.tolist()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        pos = math.exp(_cos(views[i], views[partner]) / t)
        denom = sum(math.exp(_cos(views[i], views[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(pos / denom)
    return total / (2 * n)


def naive_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        logits = [_cos(qi, ki) / t] + [_cos(qi, neg) / t for neg in queue.tolist()]
        total += _neg_log_softmax_at(logits, 0)
    return total / len(q)


def naive_contrastive_batch(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    total = 0.0
    for i, qi in enumerate(q.tolist()):
        logits = [_cos(qi, kj) / t for kj in k.tolist()]
        total += _neg_log_softmax_at(logits, i)
    return 2 * t * total / len(q)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def naive_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center: list[float],
               s_temp: float, t_temp: float) -> float:
    total, pairs = 0.0, 0
    for i, t_view in enumerate(teacher):
        for j, s_view in enumerate(student):
            if i == j:
                continue
            per_sample = 0.0
            for t_row, s_row in zip(t_view.tolist(), s_view.tolist()):
                p_t = _softmax([(v - c) / t_temp for v, c in zip(t_row, center)])
                p_s = _softmax([v / s_temp for v in s_row])
                per_sample += -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s))
            total += per_sample / len(t_view)
            pairs += 1
    return total / pairs


def naive_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              norm_pix: bool) -> float:
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for l in range(pred.shape[1]):
            if not mask[b, l]:
                continue
            t = target[b, l].tolist()
            if norm_pix:
                mean = sum(t) / len(t)
                var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            p = pred[b, l].tolist()
            total += sum((pv - tv) ** 2 for pv, tv in zip(p, t)) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("t", TEMPERATURES)
def test_nt_xent_matches_naive_loop(t):
    z1, z2 = _rand(5, 7, seed=0), _rand(5, 7, seed=1)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-9)


def test_nt_xent_is_invariant_to_projection_scale():
    z1, z2 = _rand(4, 6, seed=2), _rand(4, 6, seed=3)
    assert nt_xent(3.0 * z1, 0.1 * z2, 0.5).item() == pytest.approx(nt_xent(z1, z2, 0.5).item())


@pytest.mark.parametrize("t", [0.01, 0.1, 0.5])
def test_nt_xent_aligned_orthogonal_pairs_known_answer(t):
    n = 4
    z = torch.eye(n, 8, dtype=torch.float64)  # pairs identical, other images orthogonal
    expected = math.log(1 + 2 * (n - 1) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-9)
    if t == 0.01:
        assert nt_xent(z, z.clone(), t).item() < 1e-30


@pytest.mark.parametrize("t", TEMPERATURES)
def test_info_nce_matches_naive_loop(t):
    q, k, queue = _rand(4, 6, seed=4), _rand(4, 6, seed=5), _rand(9, 6, seed=6)
    expected = naive_info_nce(q, k, queue, t)
    assert info_nce(q, k, queue, t).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("t", [0.01, 0.2])
def test_info_nce_aligned_pairs_known_answer(t):
    q = torch.eye(3, 8, dtype=torch.float64)
    queue = torch.eye(8, dtype=torch.float64)[3:]  # (5, 8), orthogonal to every query
    expected = math.log(1 + 5 * math.exp(-1 / t))
    assert info_nce(q, 2.0 * q, queue, t).item() == pytest.approx(expected, rel=1e-9)


def test_info_nce_gradient_reaches_queries_only():
    q = _rand(4, 6, seed=7).requires_grad_()
    k = _rand(4, 6, seed=8).requires_grad_()
    queue = _rand(10, 6, seed=9).requires_grad_()
    info_nce(q, k, queue, 0.2).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


@pytest.mark.parametrize("t", TEMPERATURES)
def test_contrastive_batch_loss_matches_naive_loop(t):
    q, k = _rand(6, 5, seed=10), _rand(6, 5, seed=11)
    expected = naive_contrastive_batch(q, k, t)
    assert contrastive_batch_loss(q, k, t).item() == pytest.approx(expected, rel=1e-9)


def test_contrastive_batch_loss_gradient_reaches_queries_only():
    q, k = _rand(6, 5, seed=12).requires_grad_(), _rand(6, 5, seed=13).requires_grad_()
    contrastive_batch_loss(q, k, 0.2).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert k.grad is None


def _dino_views(num_views: int, seed: int, b: int = 3, k: int = 5) -> list[torch.Tensor]:
    return [_rand(b, k, seed=seed + v) for v in range(num_views)]


@pytest.mark.parametrize("s_temp,t_temp", [(0.1, 0.04), (0.1, 0.07), (1.0, 0.5)])
def test_dino_loss_matches_naive_loop(s_temp, t_temp):
    student, teacher = _dino_views(4, seed=20), _dino_views(2, seed=30)
    center = _rand(5, seed=40) * 0.3
    got = dino_loss(student, teacher, center, s_temp, t_temp).item()
    expected = naive_dino(student, teacher, center.tolist(), s_temp, t_temp)
    assert got == pytest.approx(expected, rel=1e-9)


def test_dino_loss_ignores_the_student_view_of_the_same_crop():
    # One global teacher view: only student views 1.. are compared with it, never student view 0.
    teacher = _dino_views(1, seed=50)
    student = _dino_views(3, seed=60)
    center = torch.zeros(5, dtype=torch.float64)
    base = dino_loss(student, teacher, center, 0.1, 0.04).item()
    changed_same = dino_loss([student[0] * -7.0] + student[1:], teacher, center, 0.1, 0.04).item()
    changed_other = dino_loss(student[:2] + [student[2] * -7.0], teacher, center, 0.1, 0.04).item()
    assert changed_same == base
    assert changed_other != pytest.approx(base)


def test_dino_loss_gradient_reaches_student_only():
    student = [v.requires_grad_() for v in _dino_views(3, seed=70)]
    teacher = [v.requires_grad_() for v in _dino_views(2, seed=80)]
    dino_loss(student, teacher, torch.zeros(5, dtype=torch.float64), 0.1, 0.04).backward()
    assert all(torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_dino_loss_needs_a_cross_view_pair():
    views = _dino_views(1, seed=90)
    with pytest.raises(ValueError, match="pair"):
        dino_loss(views, views, torch.zeros(5, dtype=torch.float64), 0.1, 0.04)


def test_dino_stats_flags_both_collapses():
    k = 6
    uniform = [torch.zeros(4, k, dtype=torch.float64)] * 2
    stats = dino_stats(uniform, torch.zeros(k, dtype=torch.float64), 0.04)
    assert stats["teacher_entropy"] == pytest.approx(math.log(k))
    assert stats["teacher_entropy_ratio"] == pytest.approx(1.0)
    assert stats["teacher_kl_uniform"] == pytest.approx(0.0, abs=1e-12)

    one_dim = [torch.zeros(4, k, dtype=torch.float64).index_fill(1, torch.tensor([2]), 5.0)] * 2
    stats = dino_stats(one_dim, torch.zeros(k, dtype=torch.float64), 0.04)
    assert stats["teacher_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert stats["teacher_entropy_ratio"] == pytest.approx(0.0, abs=1e-9)
    assert stats["teacher_kl_uniform"] == pytest.approx(math.log(k), rel=1e-9)
    # The centre removes the dominant dimension, so the teacher is uniform again.
    center = one_dim[0][0]
    assert dino_stats(one_dim, center, 0.04)["teacher_entropy"] == pytest.approx(math.log(k))


def test_dino_stats_matches_naive_loop():
    teacher, center = _dino_views(2, seed=100), _rand(5, seed=110) * 0.2
    probs = [_softmax([(v - c) / 0.1 for v, c in zip(row, center.tolist())])
             for view in teacher for row in view.tolist()]
    entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / len(probs)
    mean = [sum(row[d] for row in probs) / len(probs) for d in range(5)]
    kl = sum(m * math.log(m * 5) for m in mean)
    stats = dino_stats(teacher, center, 0.1)
    assert stats["teacher_entropy"] == pytest.approx(entropy, rel=1e-9)
    assert stats["teacher_kl_uniform"] == pytest.approx(kl, rel=1e-9)
    assert all(isinstance(v, float) for v in stats.values())


def _mae_inputs(seed: int):
    pred, target = _rand(2, 6, 12, seed=seed), _rand(2, 6, 12, seed=seed + 1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=torch.float64)
    return pred, target, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_naive_loop(norm_pix):
    pred, target, mask = _mae_inputs(120)
    expected = naive_mae(pred, target, mask, norm_pix)
    assert mae_loss(pred, target, mask, norm_pix).item() == pytest.approx(expected, rel=1e-9)
    assert mae_loss(pred, target, mask.bool(), norm_pix).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_ignores_visible_patches(norm_pix):
    pred, target, mask = _mae_inputs(130)
    spoiled = pred + 100.0 * (1 - mask)[..., None]  # large error on visible patches only
    assert mae_loss(spoiled, target, mask, norm_pix).item() == pytest.approx(
        mae_loss(pred, target, mask, norm_pix).item(), rel=1e-12)


def test_mae_loss_norm_pix_removes_patch_brightness_and_contrast():
    pred, target, mask = _mae_inputs(140)
    scale, shift = _rand(2, 6, 1, seed=150).abs() + 0.5, _rand(2, 6, 1, seed=151) * 10
    relit = target * scale + shift
    assert mae_loss(pred, relit, mask, True).item() == pytest.approx(
        mae_loss(pred, target, mask, True).item(), rel=1e-4)
    assert mae_loss(pred, relit, mask, False).item() != pytest.approx(
        mae_loss(pred, target, mask, False).item(), rel=1e-2)
    flat = torch.full_like(target, 0.5)  # constant patches normalise to exactly 0
    assert mae_loss(torch.zeros_like(pred), flat, mask, True).item() == 0.0
    assert mae_loss(torch.zeros_like(pred), flat, mask, False).item() == 0.25


def test_mae_loss_gradient_flows_to_masked_predictions():
    pred, target, mask = _mae_inputs(160)
    pred.requires_grad_()
    mae_loss(pred, target, mask, True).backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[mask.bool()].abs().sum(-1) > 0).all()
    assert (pred.grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("loss_name", ["nt_xent", "contrastive_batch_loss"])
def test_contrastive_losses_give_finite_gradients(loss_name):
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, 16, requires_grad=True)
    loss = nt_xent(a, b, 0.07) if loss_name == "nt_xent" else contrastive_batch_loss(a, b, 0.07)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    if loss_name == "nt_xent":
        assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_patchify_layout_matches_loop_and_round_trips():
    images = _rand(2, 3, 8, 12, seed=170)
    p = 4
    patches = patchify(images, p)
    assert patches.shape == (2, 6, p * p * 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                block = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (C, p, p)
                expected = [block[c, r, s].item()
                            for r in range(p) for s in range(p) for c in range(3)]
                assert patches[b, i * 3 + j].tolist() == expected
    square = _rand(2, 3, 8, 8, seed=171)
    assert torch.equal(unpatchify(patchify(square, p), p, 3), square)


def test_patchify_rejects_sizes_that_do_not_tile():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.zeros(1, 6, 48), 4, 3)


def naive_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    """Squared distance of each pair of unit vectors, averaged over images."""
    total = 0.0
    for row_p, row_z in zip(p.tolist(), z.tolist()):
        norm_p, norm_z = math.sqrt(sum(x * x for x in row_p)), math.sqrt(sum(x * x for x in row_z))
        total += sum((a / norm_p - b / norm_z) ** 2 for a, b in zip(row_p, row_z))
    return total / len(p)


def test_byol_loss_matches_naive_loop():
    p, z = _rand(5, 7, seed=0), _rand(5, 7, seed=1)
    assert byol_loss(p, z).item() == pytest.approx(naive_byol(p, z), rel=1e-6)


def test_byol_loss_known_answers_and_gradient_to_the_prediction_only():
    z = _rand(4, 6, seed=2)
    assert byol_loss(3.0 * z, z).item() == pytest.approx(0.0, abs=1e-6)  # same direction
    assert byol_loss(-z, z).item() == pytest.approx(4.0, rel=1e-6)        # opposite
    p, target = _rand(4, 6, seed=3).requires_grad_(), z.clone().requires_grad_()
    byol_loss(p, target).backward()
    assert p.grad is not None and target.grad is None
