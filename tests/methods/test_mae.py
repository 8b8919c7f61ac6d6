"""methods/masking.py and methods/mae.py: exact masking ratio, encoder on visible patches only,
reconstruction loss on removed patches only."""
from __future__ import annotations

import pytest
import torch

from methods.backbones import BACKBONES, BackboneConfig, normalize
from methods.config import ConfigError
from methods.losses import mae_loss, patchify, unpatchify
from methods.mae import MAE, MAEConfig
from methods.masking import num_visible, place_tokens, random_masking, take_tokens
from methods.vit import ViT


@pytest.fixture(autouse=True)
def vit_test(monkeypatch):
    monkeypatch.setitem(BACKBONES, "vit_test",
                        lambda cfg, size: (ViT(size, cfg.patch_size, 32, 2, 2), 32))


def _mae(**overrides) -> MAE:
    torch.manual_seed(0)
    cfg = MAEConfig(**{"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, **overrides})
    return MAE(cfg, BackboneConfig(name="vit_test", patch_size=4), 16)


@pytest.mark.parametrize("num_patches,ratio,keep", [(16, 0.75, 4), (64, 0.75, 16),
                                                    (10, 0.6, 4), (49, 0.9, 4)])
def test_random_masking_removes_exactly_the_ratio(num_patches, ratio, keep):
    assert num_visible(num_patches, ratio) == keep
    ids_keep, mask = random_masking(5, num_patches, ratio, torch.device("cpu"),
                                    torch.Generator().manual_seed(0))
    assert ids_keep.shape == (5, keep) and mask.shape == (5, num_patches)
    assert (mask.sum(dim=1) == num_patches - keep).all()
    for row, ids in zip(mask, ids_keep):
        assert ids.tolist() == sorted(set(ids.tolist()))
        assert (~row).nonzero().squeeze(1).tolist() == ids.tolist()


def test_random_masking_draws_differ_per_image_and_follow_the_generator():
    a = random_masking(8, 16, 0.75, torch.device("cpu"), torch.Generator().manual_seed(0))[1]
    b = random_masking(8, 16, 0.75, torch.device("cpu"), torch.Generator().manual_seed(0))[1]
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) > 1


def test_take_and_place_tokens_invert_each_other():
    tokens = torch.randn(2, 6, 3)
    ids = torch.tensor([[0, 4], [1, 5]])
    taken = take_tokens(tokens, ids)
    assert torch.equal(taken[1, 0], tokens[1, 1])
    placed = place_tokens(torch.zeros(2, 6, 3), taken, ids)
    assert torch.equal(placed[0, 4], tokens[0, 4]) and placed[0, 1].abs().sum() == 0


def test_encoder_sees_only_the_visible_patches():
    model = _mae()
    seen = []
    model.backbone.blocks.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape))
    x = normalize(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    pred, mask = model.reconstruct(x, torch.Generator().manual_seed(0))
    assert seen == [torch.Size([2, 1 + 4, 32])]  # CLS + 4 of 16 patches
    # changing the pixels of removed patches changes nothing the model computes
    patches = patchify(x, 4)
    patches[mask] = torch.randn_like(patches[mask])
    other = unpatchify(patches, 4, 3)
    pred_other, mask_other = model.reconstruct(other, torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask_other)
    torch.testing.assert_close(pred, pred_other)


def test_loss_is_computed_on_removed_patches_only():
    model = _mae()
    grads = []
    model.decoder_pred.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0]))
    batch = {"view": torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)}
    torch.manual_seed(7)
    loss, metrics = model(batch)
    loss.backward()
    torch.manual_seed(7)  # the forward's first random draw is the mask
    _, mask = random_masking(3, 16, 0.75, torch.device("cpu"))
    per_patch = grads[0].abs().sum(dim=-1)  # (B, L) gradient reaching each predicted patch
    assert (per_patch[~mask] == 0).all() and (per_patch[mask] > 0).all()
    assert metrics["mask_fraction"] == pytest.approx(0.75)
    with torch.no_grad():
        torch.manual_seed(7)
        pred, mask = model.reconstruct(normalize(batch["view"]))
        expected = mae_loss(pred, patchify(normalize(batch["view"]), 4), mask, True)
    torch.testing.assert_close(loss.detach(), expected)


def test_embed_pools_patch_tokens_of_the_whole_image_or_takes_cls():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    model = _mae().eval()
    tokens = model.backbone.encode(model.backbone.patch_tokens(normalize(images)))
    torch.testing.assert_close(model.embed(images), tokens[:, 1:].mean(dim=1))
    cls_model = _mae(pool="cls").eval()
    torch.testing.assert_close(cls_model.embed(images), cls_model.backbone(normalize(images)))


def test_log_images_show_removed_patches_grey():
    model = _mae(norm_pix=False)
    pictures = model.log_images({"view": torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)})
    assert set(pictures) == {"mae/original", "mae/masked", "mae/reconstruction"}
    masked = patchify(pictures["mae/masked"], 4)  # (2, 16, 48)
    grey = (masked == 0.5).all(dim=-1)
    assert (grey.sum(dim=1) == 12).all()


def test_mae_needs_a_vit_and_a_ratio_that_leaves_patches_on_both_sides():
    with pytest.raises(ConfigError, match="ViT"):
        MAE(MAEConfig(), BackboneConfig(name="resnet_small", width=4), 16)
    with pytest.raises(ConfigError, match="mask_ratio"):
        _mae(mask_ratio=0.95)  # int(16 * 0.05) = 0 visible patches
