"""methods/moco.py and methods/moco_v3.py: the loss is InfoNCE of the query against the momentum
key and the queue, the keys are enqueued, the heads are the papers', MoCo v3's loss is symmetric."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbones import BackboneConfig, normalize
from methods.losses import contrastive_batch_loss, info_nce
from methods.moco import MoCo, MoCoV1Config, MoCoV2Config, shuffled_bn_forward
from methods.moco_v3 import MoCoV3, MoCoV3Config, views as pair_views
from methods.vit import ViT

BACKBONE = BackboneConfig(name="resnet_small", width=4)


def _batch(seed: int = 0, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"view{i}": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
            for i in (1, 2)}


def _moco(cfg) -> MoCo:
    torch.manual_seed(0)
    return MoCo(cfg, BACKBONE, 16)


def test_moco_loss_is_info_nce_against_the_key_encoder_and_the_queue_then_enqueues():
    model = _moco(MoCoV2Config(queue_size=10, proj_hidden_dim=16, proj_dim=8))
    batch = _batch()
    reference = copy.deepcopy(model)
    queue_before, ptr_before = model.queue.keys.clone(), int(model.queue.ptr)
    loss, _ = model(batch)
    with torch.no_grad():
        q = reference.head(reference.backbone(normalize(batch["view1"])))
        k = F.normalize(reference.head_k(reference.backbone_k(normalize(batch["view2"]))), dim=1)
        expected = info_nce(q, k, queue_before, 0.2)
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.equal(model.queue.keys, queue_before), "the keys are enqueued in on_step"
    model.on_step(0, 10)
    slots = [(ptr_before + i) % 10 for i in range(6)]
    torch.testing.assert_close(model.queue.keys[slots], k)
    untouched = [i for i in range(10) if i not in slots]
    assert torch.equal(model.queue.keys[untouched], queue_before[untouched])
    assert int(model.queue.ptr) == (ptr_before + 6) % 10


def test_gradient_reaches_the_query_encoder_only():
    model = _moco(MoCoV1Config(queue_size=10, proj_dim=8))
    loss, _ = model(_batch())
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.backbone_k.parameters())


def test_v1_has_a_linear_head_and_v2_an_mlp_head():
    v1 = _moco(MoCoV1Config(queue_size=10, proj_dim=8))
    v2 = _moco(MoCoV2Config(queue_size=10, proj_hidden_dim=16, proj_dim=8))
    assert [type(m) for m in v1.head] == [nn.Linear]
    assert [type(m) for m in v2.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert v1.queue.keys.shape == (10, 8)


def test_shuffled_bn_forward_is_the_plain_forward_on_one_worker():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.randn(5, 3)
    torch.testing.assert_close(shuffled_bn_forward(encoder, x), encoder(x))


def _moco_v3(**overrides) -> MoCoV3:
    torch.manual_seed(0)
    cfg = MoCoV3Config(**{"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16, **overrides})
    return MoCoV3(cfg, BackboneConfig(name="vit_test", patch_size=4), 16)


def test_moco_v3_loss_is_symmetric_and_uses_the_momentum_keys(monkeypatch):
    from methods.backbones import BACKBONES
    monkeypatch.setitem(BACKBONES, "vit_test",
                        lambda cfg, size: (ViT(size, cfg.patch_size, 32, 2, 2), 32))
    model = _moco_v3()
    batch = _batch()
    swapped = {"view1": batch["view2"], "view2": batch["view1"]}
    loss, _ = model(batch)
    torch.testing.assert_close(model(swapped)[0], loss)
    with torch.no_grad():
        x1, x2 = normalize(batch["view1"]), normalize(batch["view2"])
        q1 = model.predictor(model.projector(model.backbone(x1)))
        q2 = model.predictor(model.projector(model.backbone(x2)))
        k1 = model.projector_k(model.backbone_k(x1))
        k2 = model.projector_k(model.backbone_k(x2))
        expected = contrastive_batch_loss(q1, k2, 0.2) + contrastive_batch_loss(q2, k1, 0.2)
    torch.testing.assert_close(loss.detach(), expected)
    assert not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine


def test_moco_v3_views_blur_and_solarise_asymmetrically():
    fn = pair_views(MoCoV3Config(), 16)
    (aug1, aug2) = fn.augs
    assert (aug1.blur_p, aug1.solarize_p, aug2.blur_p, aug2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
