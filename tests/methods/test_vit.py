"""methods/vit.py: the registered ViT backbones, positions, and the token-level interface."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.vision_transformer import EncoderBlock

from methods.backbones import BACKBONES, BackboneConfig, build_backbone
from methods.config import ConfigError
from methods.vit import ViT, sincos_2d


def _tiny() -> ViT:
    """A 2-block, 32-wide ViT on 16 px images with 4 px patches: the same code, fast."""
    torch.manual_seed(0)
    return ViT(image_size=16, patch_size=4, dim=32, depth=2, heads=2).eval()


@pytest.mark.parametrize("name,dim,depth,heads", [("vit_tiny", 192, 12, 3),
                                                  ("vit_small", 384, 12, 6)])
def test_registered_sizes(name, dim, depth, heads):
    net, out_dim = BACKBONES[name](BackboneConfig(name=name, patch_size=8), 16)
    assert out_dim == dim == net.dim
    assert len(net.blocks) == depth and all(isinstance(b, EncoderBlock) for b in net.blocks)
    assert net.blocks[0].num_heads == heads


def test_depth_overrides_the_size_and_zero_keeps_it():
    shallow, dim = build_backbone(BackboneConfig(name="vit_tiny", patch_size=8, depth=4), 16)
    assert len(shallow.blocks) == 4 and dim == 192 and shallow.blocks[0].num_heads == 3
    default, _ = build_backbone(BackboneConfig(name="vit_tiny", patch_size=8, depth=0), 16)
    assert len(default.blocks) == 12


def test_negative_depth_is_a_config_error():
    from methods.config import build
    with pytest.raises(ConfigError, match="depth"):
        build(BackboneConfig, {"name": "vit_tiny", "depth": -1}, "backbone")
    with pytest.raises(ConfigError, match="backbone.depth: 4 .*resnet_small"):
        build(BackboneConfig, {"name": "resnet_small", "depth": 4}, "backbone")


def test_vit_base_is_registered_with_its_width():
    assert "vit_base" in BACKBONES
    from methods.vit import SIZES
    assert SIZES["vit_base"] == (768, 12, 12)


def test_forward_gives_the_cls_feature_per_image():
    net = _tiny()
    x = torch.randn(3, 3, 16, 16)
    features = net(x)
    assert features.shape == (3, 32) and torch.isfinite(features).all()
    torch.testing.assert_close(features, net.encode(net.patch_tokens(x))[:, 0])
    torch.testing.assert_close(net(x[:1]), features[:1], rtol=1e-4, atol=1e-5)  # no batch mixing
    assert net.grid == 4 and net.num_patches == 16


def test_patch_size_must_divide_the_image():
    with pytest.raises(ConfigError, match="patch_size"):
        build_backbone(BackboneConfig(name="vit_tiny", patch_size=5), 16)
    net, dim = build_backbone(BackboneConfig(name="vit_tiny", patch_size=8), 32)
    assert net.grid == 4 and net.patch_embed.kernel_size == (8, 8) and dim == 192


def test_sincos_positions_known_values():
    pos = sincos_2d(3, 8)  # (9, 8): [sin row, cos row, sin col, cos col], 2 frequencies each
    assert pos.shape == (9, 8)
    torch.testing.assert_close(pos[0], torch.tensor([0., 0., 1., 1., 0., 0., 1., 1.]))
    row1_col2 = pos[1 * 3 + 2]
    freqs = [1.0, 1.0 / 100.0]  # 1 / 10000^(i / 2)
    expected = ([math.sin(1 * f) for f in freqs] + [math.cos(1 * f) for f in freqs]
                + [math.sin(2 * f) for f in freqs] + [math.cos(2 * f) for f in freqs])
    torch.testing.assert_close(row1_col2, torch.tensor(expected))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(3, 6)


def test_positions_are_fixed_and_not_checkpointed():
    net = _tiny()
    assert "pos_embed" not in net.state_dict()
    assert not any(p is net.pos_embed for p in net.parameters())


def test_patch_tokens_are_row_major_with_positions():
    net = _tiny()
    x = torch.zeros(1, 3, 16, 16)
    x[0, :, 4:8, 8:12] = 1.0  # the patch at row 1, column 2
    tokens = net.patch_tokens(x)  # (1, 16, 32)
    base = net.patch_tokens(torch.zeros(1, 3, 16, 16))
    changed = (tokens - base).abs().sum(-1)[0]  # (16,)
    assert changed.argmax().item() == 1 * 4 + 2 and (changed > 0).sum() == 1


def test_smaller_inputs_use_interpolated_positions():
    net = _tiny()
    tokens = net.patch_tokens(torch.randn(2, 3, 8, 8))
    assert tokens.shape == (2, 4, 32)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 32)
    torch.testing.assert_close(net.positions(4), net.pos_embed)


def test_encode_takes_any_subset_of_tokens():
    net = _tiny()
    tokens = net.patch_tokens(torch.randn(2, 3, 16, 16))
    subset = tokens[:, [0, 5, 9]]
    out = net.encode(subset)
    assert out.shape == (2, 4, 32)
    # the CLS output depends only on the tokens given
    other = tokens.clone()
    other[:, [1, 2, 3]] += 10.0
    torch.testing.assert_close(net.encode(other[:, [0, 5, 9]]), out)


def test_gradients_reach_every_parameter():
    net = _tiny().train()
    net(torch.randn(2, 3, 16, 16)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
