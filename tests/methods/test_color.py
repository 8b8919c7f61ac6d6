"""RGB <-> Lab against scikit-image, and the ab quantisation of colorization (arXiv:1603.08511)."""
import math
import warnings

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from methods.color import (ab_bins, ab_prior, decode_ab, encode_ab, lab_to_rgb, rebalance_weights,
                           rgb_to_lab)


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)


def _pixel(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1)


def test_rgb_to_lab_matches_skimage_on_random_colours():
    rgb = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lab = rgb_to_lab(rgb)  # (B, 3, H, W)
    assert lab.shape == rgb.shape
    np.testing.assert_allclose(_to_hwc(lab), rgb2lab(_to_hwc(rgb)), atol=1e-6)


def test_rgb_to_lab_float32_within_1e_3_of_skimage():
    rgb = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    lab = rgb_to_lab(rgb)
    assert lab.dtype == torch.float32
    np.testing.assert_allclose(_to_hwc(lab), rgb2lab(_to_hwc(rgb.double())), atol=1e-3)


@pytest.mark.parametrize("rgb, expected", [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
])
def test_rgb_to_lab_known_values(rgb, expected):
    # Published values use the exact sRGB matrix; skimage's 6-digit matrix (which we match to
    # 1e-6 above) maps white to a = -0.0025, b = 0.0047, hence 5e-3 rather than 1e-3 here.
    lab = rgb_to_lab(_pixel(*rgb)).flatten()
    np.testing.assert_allclose(lab.numpy(), expected, atol=5e-3)


def test_lab_to_rgb_matches_skimage_including_out_of_gamut():
    gen = torch.Generator().manual_seed(2)
    lab = torch.stack([torch.rand(40, 50, generator=gen, dtype=torch.float64) * 100,
                       torch.rand(40, 50, generator=gen, dtype=torch.float64) * 256 - 128,
                       torch.rand(40, 50, generator=gen, dtype=torch.float64) * 256 - 128])[None]
    rgb = lab_to_rgb(lab)  # (1, 3, 40, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about negative Z it clips
        expected = lab2rgb(_to_hwc(lab)[0])
    np.testing.assert_allclose(_to_hwc(rgb)[0], expected, atol=1e-6)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_round_trip_rgb_lab_rgb():
    rgb = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0)


def test_finite_gradients_at_black_white_and_slightly_out_of_range():
    # Grey pixels at 0, 1, 0.5 and the values a network's output may overshoot to.
    values = torch.tensor([0.0, 1.0, 0.5, -0.1, 1.1], dtype=torch.float64)
    rgb = values.view(1, 1, 1, 5).expand(1, 3, 1, 5).clone().requires_grad_()
    lab = rgb_to_lab(rgb)  # (1, 3, 1, 5)
    np.testing.assert_allclose(_to_hwc(lab.detach()), rgb2lab(_to_hwc(rgb.detach())), atol=1e-6)
    (lab.sum() + lab_to_rgb(lab).sum()).backward()
    assert torch.isfinite(rgb.grad).all()


def test_ab_bins_cover_the_srgb_gamut_on_a_grid():
    bins = ab_bins(10)  # (Q, 2)
    # Measured: 261 for grid 10; the paper's 313 also has cells outside the sRGB gamut.
    assert 240 <= bins.shape[0] <= 320
    assert torch.equal(bins, torch.round(bins / 10) * 10)
    assert len({tuple(b) for b in bins.tolist()}) == bins.shape[0]
    # Every sRGB colour, primaries included, falls in the cell of one of the bins.
    rgb = torch.cat([torch.rand(3, 2000, generator=torch.Generator().manual_seed(4)),
                     torch.tensor([[1., 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 1]])],
                    dim=1).view(1, 3, 1, -1)
    ab = rgb_to_lab(rgb)[0, 1:, 0].T  # (N, 2)
    cell_gap = (ab[:, None, :] - bins[None]).abs().amax(dim=2).amin(dim=1)  # (N,)
    assert cell_gap.max() <= 5.0 + 1e-4


def test_ab_bins_returns_a_copy():
    ab_bins(10).zero_()
    assert ab_bins(10).abs().sum() > 0


def _naive_soft_encode(ab_pixel, bins, sigma, k):
    dists = [math.dist(ab_pixel, b) for b in bins.tolist()]
    nearest = sorted(range(len(dists)), key=dists.__getitem__)[:k]
    weights = {q: math.exp(-dists[q] ** 2 / (2 * sigma ** 2)) for q in nearest}
    total = sum(weights.values())
    return [weights.get(q, 0.0) / total for q in range(len(dists))]


def test_encode_ab_matches_naive_soft_encoding():
    bins = ab_bins(10)
    ab = (torch.rand(2, 2, 3, 2, generator=torch.Generator().manual_seed(5)) - 0.5) * 120
    targets = encode_ab(ab, bins, sigma=5.0, k=5)  # (B, Q, H, W)
    assert targets.shape == (2, bins.shape[0], 3, 2)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(2, 3, 2))
    assert ((targets > 0).sum(dim=1) == 5).all()
    for b in range(2):
        for y in range(3):
            for x in range(2):
                pixel = ab[b, :, y, x].tolist()
                expected = torch.tensor(_naive_soft_encode(pixel, bins, 5.0, 5))
                torch.testing.assert_close(targets[b, :, y, x], expected, atol=1e-5, rtol=0)
                nearest = torch.cdist(ab[b, :, y, x][None], bins).argmin()
                assert targets[b, :, y, x].argmax() == nearest


def test_decode_ab_of_one_hot_gives_the_bin_at_low_temperature():
    bins = ab_bins(10)
    chosen = torch.tensor([[0, 17], [100, bins.shape[0] - 1]])  # (H, W) bin indices
    logits = torch.nn.functional.one_hot(chosen, bins.shape[0]).permute(2, 0, 1)[None].float()
    ab = decode_ab(logits, bins, temperature=0.01)  # (1, 2, 2, 2)
    torch.testing.assert_close(ab[0], bins[chosen].permute(2, 0, 1))


def test_decode_ab_annealing_moves_from_mean_to_mode():
    bins = ab_bins(10)
    logits = torch.randn(1, bins.shape[0], 1, 1, generator=torch.Generator().manual_seed(6))
    probs = torch.softmax(logits[0, :, 0, 0], dim=0)
    torch.testing.assert_close(decode_ab(logits, bins, temperature=1.0)[0, :, 0, 0], probs @ bins)
    mode = bins[logits[0, :, 0, 0].argmax()]
    torch.testing.assert_close(decode_ab(logits, bins, temperature=1e-3)[0, :, 0, 0], mode)


def test_rebalance_weights_have_unit_expectation_under_the_prior():
    prior = torch.rand(50, generator=torch.Generator().manual_seed(7), dtype=torch.float64) ** 4
    prior = prior / prior.sum()
    weights = rebalance_weights(prior, lam=0.5)
    expected = [1.0 / (0.5 * p + 0.5 / 50) for p in prior.tolist()]
    norm = sum(p * w for p, w in zip(prior.tolist(), expected))
    torch.testing.assert_close(weights, torch.tensor([w / norm for w in expected],
                                                     dtype=torch.float64))
    torch.testing.assert_close((prior * weights).sum(), torch.tensor(1.0, dtype=torch.float64))
    assert weights[prior.argmax()] == weights.min()  # frequent colours are down-weighted


def test_rebalance_weights_lambda_one_is_uniform_and_zero_is_inverse_prior():
    prior = torch.tensor([0.7, 0.2, 0.1])
    torch.testing.assert_close(rebalance_weights(prior, lam=1.0), torch.ones(3))
    inverse = rebalance_weights(prior, lam=0.0)
    torch.testing.assert_close(inverse * prior, torch.full((3,), 1.0 / 3))


def test_ab_prior_is_a_smoothed_histogram():
    bins = ab_bins(10)
    ab = torch.zeros(1, 2, 4, 4)
    ab[0, :, :, :3] = torch.tensor([40.0, -20.0]).view(2, 1, 1)  # 12 pixels at one bin
    prior = ab_prior(ab, bins, sigma=5.0)  # (Q,)
    torch.testing.assert_close(prior.sum(), torch.tensor(1.0))
    at = {tuple(b): q for q, b in enumerate(bins.tolist())}
    grey, colour, neighbour = at[(0.0, 0.0)], at[(40.0, -20.0)], at[(50.0, -20.0)]
    assert prior[colour] / prior[grey] == pytest.approx(3.0, rel=1e-4)
    assert prior[neighbour] / prior[colour] == pytest.approx(math.exp(-2.0), rel=1e-4)
