"""methods/cpc.py: the patch grid, the row-causal context and the CPC InfoNCE loss against a naive
loop reference."""
from __future__ import annotations

import math

import pytest
import torch

from methods.backbones import BackboneConfig, normalize
from methods.config import ConfigError, build
from methods.cpc import CPC, CPCConfig, RowCausalContext, cpc_loss, grid_patches, views


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_cpc_loss(z: torch.Tensor, predictions: list[torch.Tensor], first_step: int = 1) -> float:
    """Loop over steps, images and positions; every patch vector of the batch is a candidate."""
    batch, grid, _, _ = z.shape
    cells = [(b, i, j) for b in range(batch) for i in range(grid) for j in range(grid)]
    per_step = []
    for k, pred in enumerate(predictions, start=first_step):
        terms = []
        for b in range(batch):
            for i in range(grid - k):
                for j in range(grid):
                    p = pred[b, i, j].tolist()
                    scores = [sum(x * y for x, y in zip(p, z[c].tolist())) for c in cells]
                    target = cells.index((b, i + k, j))
                    top = max(scores)
                    log_norm = top + math.log(sum(math.exp(s - top) for s in scores))
                    terms.append(log_norm - scores[target])
        per_step.append(sum(terms) / len(terms))
    return sum(per_step) / len(per_step)


@pytest.mark.parametrize("batch,grid,steps,first", [(2, 3, 1, 1), (2, 3, 2, 1), (1, 4, 3, 1),
                                                    (2, 4, 2, 2), (1, 5, 2, 2)])
def test_cpc_loss_matches_the_naive_reference(batch, grid, steps, first):
    z = _rand(batch, grid, grid, 5, seed=0)
    predictions = [_rand(batch, grid - k, grid, 5, seed=k) for k in range(first, first + steps)]
    assert cpc_loss(z, predictions, first).item() == pytest.approx(
        naive_cpc_loss(z, predictions, first), rel=1e-9)


def test_cpc_loss_is_low_when_predictions_hit_their_targets():
    z = _rand(2, 3, 3, 16, seed=0) * 10
    perfect = [z[:, k:].clone() for k in (1, 2)]
    wrong = [z[:, :3 - k].flip(0).clone() for k in (1, 2)]
    assert cpc_loss(z, perfect) < 0.01 < cpc_loss(z, wrong)


def test_grid_patches_are_half_overlapping_crops_in_row_major_order():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    patches = grid_patches(images, 3)  # stride 4, patch 8
    assert patches.shape == (2 * 9, 3, 8, 8)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                expected = images[b, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8]
                assert torch.equal(patches[b * 9 + i * 3 + j], expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_patches(torch.zeros(1, 3, 15, 15), 3)
    with pytest.raises(ConfigError, match="method.grid.*data.image_size"):
        views(CPCConfig(grid=3), 15)


@pytest.mark.parametrize("row", [0, 2, 4])
def test_context_at_row_i_sees_only_rows_up_to_i(row):
    torch.manual_seed(0)
    context = RowCausalContext(dim=4, num_layers=3)
    z = torch.randn(2, 4, 5, 5)
    changed = z.clone()
    changed[:, :, row:] += torch.randn_like(changed[:, :, row:])
    c, c_changed = context(z), context(changed)
    torch.testing.assert_close(c[:, :, :row], c_changed[:, :, :row])
    assert not torch.allclose(c[:, :, row], c_changed[:, :, row])


def test_patches_are_encoded_without_batch_statistics():
    """CPC v2's layer normalisation: a patch's vector does not depend on the other patches and
    images of the batch, in training mode too (BatchNorm would let patches see each other)."""
    torch.manual_seed(0)
    model = CPC(CPCConfig(grid=3, steps=1, context_layers=1),
                BackboneConfig(name="resnet_small", width=4), 16).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        alone = model.patch_vectors(normalize(images[:1]))
        together = model.patch_vectors(normalize(images))[:1]
    torch.testing.assert_close(alone, together)


def test_model_predicts_rows_below_from_the_context_and_embeds_pooled_patches():
    torch.manual_seed(0)
    model = CPC(CPCConfig(grid=3, steps=2, first_step=1, context_layers=1),
                BackboneConfig(name="resnet_small", width=4), 16).eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    z = model.patch_vectors(normalize(images))
    assert z.shape == (2, 3, 3, 32)
    torch.testing.assert_close(model.embed(images), z.mean(dim=(1, 2)))
    assert len(model.predictors) == 2


def test_config_rejects_more_steps_than_rows():
    with pytest.raises(ConfigError, match="steps"):
        build(CPCConfig, {"grid": 3, "steps": 3, "first_step": 1}, "method")
    with pytest.raises(ConfigError, match="steps: predicting rows 2..3"):  # skips k = 1
        build(CPCConfig, {"grid": 3, "steps": 2}, "method")
    with pytest.raises(ConfigError, match="grid"):
        CPC(CPCConfig(grid=4, steps=2), BackboneConfig(name="resnet_small", width=4), 16)
