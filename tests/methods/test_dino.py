"""methods/dino.py: multi-crop views, the weight-normalised head, the centre update, the loss and
the collapse metrics, features from the teacher."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from methods.backbones import BackboneConfig, normalize
from methods.config import ConfigError, build
from methods.dino import DINO, DINOConfig, DINOHead, views
from methods.losses import dino_loss, dino_stats

SMALL = {"out_dim": 16, "head_hidden_dim": 16, "bottleneck_dim": 8, "n_local": 2,
         "local_size": 8}


def _dino(**overrides) -> DINO:
    torch.manual_seed(0)
    return DINO(DINOConfig(**{**SMALL, **overrides}), BackboneConfig(name="resnet_small", width=4),
                16)


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return views(DINOConfig(**SMALL), 16)(images, torch.Generator().manual_seed(1))


def test_multicrop_gives_two_global_and_n_local_crops():
    batch = _batch()
    assert sorted(batch) == ["global0", "global1", "local0", "local1"]
    assert batch["global0"].shape == (4, 3, 16, 16) and batch["local1"].shape == (4, 3, 8, 8)
    fn = views(DINOConfig(), 224)
    assert [a.blur_p for a in fn.global_augs] == [1.0, 0.1] and fn.local_aug.blur_p == 0.5
    assert [a.solarize_p for a in fn.global_augs] == [0.0, 0.2]


def test_head_is_a_cosine_layer_with_a_fixed_norm():
    torch.manual_seed(0)
    head = DINOHead(6, 10, 12, 4, 3, norm_last_layer=True)
    x = torch.randn(5, 6)
    out = head(x)
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(head.last_v, dim=1).T
    torch.testing.assert_close(out, expected)
    assert not head.last_g.requires_grad
    assert head(torch.randn(5, 6)).abs().max() <= 1.0 + 1e-6
    assert DINOHead(6, 10, 12, 4, 3, norm_last_layer=False).last_g.requires_grad


def test_frozen_last_layer_keeps_the_output_and_gets_no_gradient():
    torch.manual_seed(0)
    head = DINOHead(6, 10, 12, 4, 3, norm_last_layer=True)
    x = torch.randn(5, 6)
    frozen = head(x, last_layer_grad=0.0)
    torch.testing.assert_close(frozen, head(x))
    frozen.square().sum().backward()
    assert torch.equal(head.last_v.grad, torch.zeros_like(head.last_v))
    assert head.mlp[0].weight.grad.abs().sum() > 0


def test_loss_metrics_and_centre_update():
    model = _dino(freeze_last_layer_frac=0.0)
    batch = _batch()
    reference = copy.deepcopy(model)
    loss, metrics = model(batch)
    with torch.no_grad():
        def features(keys):  # the backbone per crop size
            return reference.backbone(normalize(torch.cat([batch[k] for k in keys])))
        # the head once over every crop, as the reference's MultiCropWrapper
        both = torch.cat([features(["global0", "global1"]), features(["local0", "local1"])])
        s = list(reference.head(both).chunk(4))
        x = normalize(torch.cat([batch["global0"], batch["global1"]]))
        t = list(reference.teacher_head(reference.teacher_backbone(x)).chunk(2))
        expected = dino_loss(s, t, torch.zeros(1, 16), 0.1, 0.04)
        stats = dino_stats(t, torch.zeros(1, 16), 0.04)
    torch.testing.assert_close(loss.detach(), expected)
    assert metrics["teacher_entropy"] == pytest.approx(stats["teacher_entropy"], rel=1e-5)
    assert metrics["teacher_kl_uniform"] == pytest.approx(stats["teacher_kl_uniform"], rel=1e-5)
    assert torch.equal(model.center, torch.zeros(1, 16)), "the centre moves in on_step"
    model.on_step(0, 10)
    torch.testing.assert_close(model.center, 0.1 * torch.cat(t).mean(dim=0, keepdim=True))


def test_the_head_normalises_over_every_crop_at_once():
    """With BatchNorm in the head, one call over all crops (global and local) gives statistics
    of the whole multi-crop batch, not of each crop size apart."""
    model = _dino(freeze_last_layer_frac=0.0, head_batch_norm=True)
    batch = _batch()
    crops = [batch[k] for k in ("global0", "global1", "local0", "local1")]
    got = model._student(crops, sizes=2)
    with torch.no_grad():
        apart = [model.head(model.backbone(normalize(torch.cat(c))))
                 for c in (crops[:2], crops[2:])]
    together = torch.cat([g.detach() for g in got])
    assert not torch.allclose(together, torch.cat(apart), atol=1e-4)


def test_last_layer_is_frozen_at_the_start():
    model = _dino(freeze_last_layer_frac=0.5)
    loss, _ = model(_batch())
    loss.backward()
    assert model.head.last_v.grad.abs().sum() == 0
    assert model.head.mlp[0].weight.grad.abs().sum() > 0


def test_features_come_from_the_teacher_by_default():
    model = _dino().eval()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # student and teacher now differ
    images = _batch()["global0"]
    torch.testing.assert_close(model.embed(images), model.teacher_backbone(normalize(images)))
    model.embed_teacher = False
    torch.testing.assert_close(model.embed(images), model.backbone(normalize(images)))


def test_config_checks_probabilities_and_scales():
    with pytest.raises(ConfigError, match="blur_p"):
        build(DINOConfig, {"blur_p": [1.0, 1.5, 0.5]}, "method")
    with pytest.raises(ConfigError, match="local_scale"):
        build(DINOConfig, {"local_scale": [0.5, 0.1]}, "method")
