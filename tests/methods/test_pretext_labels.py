"""The pretext labels, method by method: each view makes the label of the transformation it
applied (rotation, neighbour position, permutation, mask, ab bins) on real images."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.backbones import normalize
from methods.color import ab_prior, encode_ab, lab_to_rgb, rebalance_weights
from methods.inpainting import FILL, loss_weights
from methods.jigsaw import permutation_set
from methods.patches import CENTRE, NEIGHBOURS
from methods.relative_loc import drop_colors
from methods.split_brain import l_labels, nearest_bins
from tests.methods.pretext_common import BATCH, make, tiny_backbone, views_of

# tiny tensors gain nothing from threads (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the labels, method by method

@pytest.mark.parametrize("images", ["rotnet"], indirect=True)
def test_rotnet_label_is_the_rotation_applied(images):
    _, views, _ = make("rotnet", crop_padding=0)
    batch = views_of(views, images)
    rotated, label = batch["rotations"], batch["rotation"]  # (B, 4, 3, S, S), (B, 4)
    assert torch.equal(label.sort(1).values, torch.arange(4).expand(BATCH, 4))
    assert not torch.equal(label, torch.arange(4).expand(BATCH, 4)), "order must be random"
    for b, i in itertools.product(range(BATCH), range(4)):
        undone = torch.rot90(rotated[b, i], -int(label[b, i]), dims=(-2, -1))
        assert torch.equal(undone, images[b])


@pytest.mark.parametrize("images", ["rotnet"], indirect=True)
def test_rotnet_rotates_one_augmented_image_four_times(images):
    _, views, _ = make("rotnet", crop_padding=3)
    batch = views_of(views, images)
    rotated, label = batch["rotations"], batch["rotation"]
    for b in range(BATCH):
        upright = [torch.rot90(rotated[b, i], -int(label[b, i]), dims=(-2, -1)) for i in range(4)]
        assert all(torch.equal(upright[0], u) for u in upright[1:])


def _crop(image: torch.Tensor, corner, size: int) -> torch.Tensor:
    y, x = (int(v) for v in corner)
    assert 0 <= y and 0 <= x and y + size <= image.shape[-2] and x + size <= image.shape[-1]
    return image[:, y:y + size, x:x + size]


@pytest.mark.parametrize("images", ["relative_loc"], indirect=True)
def test_relative_loc_label_is_the_neighbours_position(images):
    _, views, cfg = make("relative_loc", color_drop=False)
    batch = views_of(views, images)
    corners, position = views.layout(BATCH, torch.Generator().manual_seed(0))
    assert torch.equal(position, batch["position"])
    # position -> (row step, column step) of the neighbour, row-major around the centre
    steps = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    p = cfg.patch_size
    for b in range(BATCH):
        centre = corners[b, CENTRE]
        assert torch.equal(batch["centre"][b], _crop(images[b], centre, p))
        assert len(set(position[b].tolist())) == cfg.pairs_per_image
        for k, pos in enumerate(position[b].tolist()):
            corner = corners[b, NEIGHBOURS[pos]]
            assert torch.equal(batch["neighbours"][b, k], _crop(images[b], corner, p))
            # one cell (patch + gap) away in the labelled direction, give or take the jitter
            cell_step = torch.tensor(steps[pos]) * (p + cfg.gap)
            assert ((corner - centre) - cell_step).abs().max() <= 2 * cfg.jitter


def test_color_drop_keeps_one_channel_of_each_patch(scenes):
    patches = torch.from_numpy(scenes[:6, :8, :8]).permute(0, 3, 1, 2)[:, None]  # (6, 1, 3, 8, 8)
    dropped = drop_colors(patches, torch.Generator().manual_seed(0))
    for b in range(6):
        kept = [c for c in range(3) if torch.equal(dropped[b, 0, c], patches[b, 0, c])]
        assert len(kept) >= 1
        spread = patches[b, 0, kept[0]].float().std()
        for c in set(range(3)) - {kept[0]}:
            assert float(dropped[b, 0, c].float().std()) <= float(spread) / 100 + 1.0


@pytest.mark.parametrize("images", ["jigsaw"], indirect=True)
def test_jigsaw_permutation_index_reassembles_the_puzzle(images):
    _, views, cfg = make("jigsaw")
    batch = views_of(views, images)
    corners, index = views.layout(BATCH, torch.Generator().manual_seed(0))
    assert torch.equal(index, batch["permutation"])
    perms = permutation_set(cfg.num_permutations, cfg.permutation_seed)
    for b in range(BATCH):
        solved = [None] * 9
        for i, cell in enumerate(perms[index[b]].tolist()):
            solved[cell] = batch["tiles"][b, i]  # tile i came from grid cell perm[i]
        for cell in range(9):
            assert torch.equal(solved[cell], _crop(images[b], corners[b, cell], cfg.tile_size))
        rows, cols = corners[b, :, 0].view(3, 3), corners[b, :, 1].view(3, 3)
        assert (rows[1:] > rows[:-1]).all() and (cols[:, 1:] > cols[:, :-1]).all()


@pytest.mark.parametrize("images", ["jigsaw"], indirect=True)
def test_jigsaw_embeds_the_tiles_of_the_unshuffled_centred_grid(images):
    model, _, cfg = make("jigsaw", embed_pool="concat")
    model.eval()
    features = model.embed(images)  # (B, 9 * D)
    extent = 3 * cfg.tile_size + 2 * cfg.gap
    origin = (images.shape[-1] - extent) // 2
    step = cfg.tile_size + cfg.gap
    with torch.no_grad():
        tiles = []
        for cell in range(9):  # row-major cells of every image
            r, c = origin + step * (cell // 3), origin + step * (cell % 3)
            tile = images[:, :, r:r + cfg.tile_size, c:c + cfg.tile_size]
            tiles.append(model.backbone(model._input(tile)))  # (B, D)
            dim = tiles[-1].shape[1]
            torch.testing.assert_close(features[:, cell * dim:(cell + 1) * dim], tiles[-1])
    assert features.shape == (BATCH, 9 * dim)
    model.embed_pool = "mean"  # the default: the nine tiles' features averaged
    torch.testing.assert_close(model.embed(images), torch.stack(tiles).mean(0))


def test_jigsaw_permutation_set_is_the_greedy_maximal_hamming_set():
    chosen = permutation_set(8, seed=3).numpy()  # (8, 9)
    assert np.array_equal(chosen, permutation_set(8, seed=3).numpy()), "deterministic"
    assert not np.array_equal(chosen, permutation_set(8, seed=4).numpy())
    assert len({tuple(p) for p in chosen}) == 8
    assert all(sorted(p) == list(range(9)) for p in chosen)
    every = np.array(list(itertools.permutations(range(9))), dtype=np.int8)  # (9!, 9)
    total = np.zeros(len(every), dtype=np.int64)  # summed Hamming distance to the chosen so far
    used = np.zeros(len(every), dtype=bool)
    for t in range(1, len(chosen)):
        total += (every != chosen[t - 1]).sum(1)
        used |= (every == chosen[t - 1]).all(1)
        # the next one is a remaining permutation with the largest summed distance
        assert sum(int((chosen[t] != chosen[s]).sum()) for s in range(t)) == total[~used].max()


@pytest.mark.parametrize("images", ["inpainting"], indirect=True)
def test_inpainting_central_mask_covers_exactly_the_central_block(images):
    _, views, _ = make("inpainting", block_fraction=0.5)
    batch = views_of(views, images)
    size = images.shape[-1]
    inside = torch.zeros(size, size, dtype=torch.bool)
    for y, x in itertools.product(range(size), range(size)):
        inside[y, x] = size // 4 <= y < 3 * size // 4 and size // 4 <= x < 3 * size // 4
    assert torch.equal(batch["mask"][:, 0].bool(), inside.expand(BATCH, -1, -1))
    fill = torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1)
    for b in range(BATCH):
        assert torch.equal(batch["masked"][b][:, ~inside], batch["image"][b][:, ~inside])
        assert (batch["masked"][b][:, inside] == fill.view(3, 1)).all()


@pytest.mark.parametrize("images", ["inpainting"], indirect=True)
def test_inpainting_random_blocks_fill_what_the_mask_marks(images):
    _, views, cfg = make("inpainting", mask="random_blocks", num_blocks=3)
    batch = views_of(views, images)
    hole = batch["mask"][:, 0].bool()  # (B, S, S)
    side = round(cfg.block_fraction * images.shape[-1] / 2)
    assert (hole.flatten(1).sum(1) >= side * side).all()
    assert (hole.flatten(1).sum(1) <= 3 * side * side).all()
    assert not torch.equal(hole[0], hole[1])
    fill = torch.tensor(FILL, dtype=torch.uint8).view(1, 3, 1, 1)
    expected = torch.where(hole[:, None], fill, batch["image"])
    assert torch.equal(batch["masked"], expected)


def test_inpainting_loss_weights_match_a_pixel_loop():
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    mask[..., 3:6, 4:7] = 1
    weights = loss_weights(mask, overlap=2, overlap_weight=10.0)[0, 0]
    holes = [(y, x) for y in range(9) for x in range(9) if mask[0, 0, y, x]]
    for y, x in itertools.product(range(9), range(9)):
        near = min(max(abs(y - hy), abs(x - hx)) for hy, hx in holes)
        expected = 1.0 if near == 0 else (10.0 if near <= 2 else 0.0)
        assert float(weights[y, x]) == expected, (y, x)


@pytest.mark.parametrize("images", ["inpainting"], indirect=True)
def test_inpainting_one_backward_gives_each_player_its_own_gradient(images):
    model, views, cfg = make("inpainting", adv_weight=0.2)
    batch = views_of(views, images)
    loss, _ = model(batch)
    loss.backward()
    disc = list(model.discriminator.parameters())
    gen = list(model.backbone.parameters()) + list(model.decoder.parameters())
    got_d, got_g = [p.grad.clone() for p in disc], [p.grad.clone() for p in gen]
    # naive reference: each player's own objective, differentiated only for its own parameters
    image = batch["image"].float() / 255
    pred = model.reconstruct(batch["masked"])
    weights = loss_weights(batch["mask"], cfg.overlap, cfg.overlap_weight)
    rec = (weights * ((pred - image) ** 2).mean(1, keepdim=True)).sum() / weights.sum()
    # the discriminator sees the predicted region only, real or predicted, on a grey surround
    region = (weights > 0).float()
    grey = torch.tensor(FILL).view(1, 3, 1, 1) / 255
    real = image * region + grey * (1 - region)
    fake = pred * region + grey * (1 - region)
    real_logit = model.discriminator(normalize(real))
    fake_logit = model.discriminator(normalize(fake))
    bce = F.binary_cross_entropy_with_logits
    g_objective = 0.8 * rec + 0.2 * bce(fake_logit, torch.ones_like(fake_logit))
    fake_detached = model.discriminator(normalize(fake.detach()))
    d_objective = (bce(real_logit, torch.ones_like(real_logit))
                   + bce(fake_detached, torch.zeros_like(fake_detached)))
    want_g = torch.autograd.grad(g_objective, gen, retain_graph=True)
    want_d = torch.autograd.grad(d_objective, disc)
    for got, want in zip(got_g + got_d, list(want_g) + list(want_d)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("images", ["colorization"], indirect=True)
def test_colorization_views_reconstruct_the_rgb_image(images):
    _, views, _ = make("colorization", flip_p=0.0)
    batch = views_of(views, images)
    assert batch["L"].shape == (BATCH, 1, 16, 16) and batch["ab"].shape == (BATCH, 2, 16, 16)
    rgb = lab_to_rgb(torch.cat([batch["L"], batch["ab"]], 1).double())
    torch.testing.assert_close(rgb, images.double() / 255, rtol=0, atol=1e-4)
    assert float(batch["ab"].abs().max()) > 5, "scenes are colour photographs"


@pytest.mark.parametrize("images", ["colorization"], indirect=True)
def test_colorization_loss_is_rebalanced_cross_entropy_with_a_learned_prior(images):
    model, views, cfg = make("colorization")
    batch = views_of(views, images)
    assert float(model.prior_sum.sum()) == 0
    model(batch)
    assert float(model.prior_sum.sum()) == 0, "forward leaves the prior's update to on_step"
    model.on_step(0, 10)
    out = model.predict(batch["L"]).detach()  # (B, Q, h, w)
    ab = F.adaptive_avg_pool2d(batch["ab"], out.shape[-2:])
    torch.testing.assert_close(model.prior_sum, ab_prior(ab, model.bins, cfg.sigma))
    loss, _ = model(batch)  # the next step is weighted by the prior seen so far
    model.on_step(1, 10)
    weights = rebalance_weights(ab_prior(ab, model.bins, cfg.sigma), cfg.rebalance_lambda)
    targets = encode_ab(ab, model.bins, cfg.sigma, cfg.neighbours)
    log_probs = out.log_softmax(1)
    total, count = 0.0, 0
    for b, y, x in itertools.product(range(BATCH), range(out.shape[2]), range(out.shape[3])):
        z = targets[b, :, y, x]
        total += float(weights[z.argmax()] * -(z * log_probs[b, :, y, x]).sum())
        count += 1
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-4)
    model.eval()
    before = model.prior_sum.clone()
    model(batch)
    model.on_step(2, 10)
    assert torch.equal(model.prior_sum, before), "evaluation must not move the prior"
    assert "prior_sum" in model.state_dict()


@pytest.mark.parametrize("images", ["colorization"], indirect=True)
def test_colorization_regression_option_trains_on_ab(images):
    model, views, _ = make("colorization", loss="regression")
    batch = views_of(views, images)
    loss, _ = model(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.predict(batch["L"]).shape[1] == 2


@pytest.mark.parametrize("images", ["split_brain"], indirect=True)
def test_split_brain_targets_and_representation(images):
    model, views, cfg = make("split_brain")
    batch = views_of(views, images)
    ab = batch["ab"][:2, :, :3, :3]
    index = nearest_bins(ab, model.bins)
    for b, y, x in itertools.product(range(2), range(3), range(3)):
        distances = [float(torch.dist(ab[b, :, y, x], q)) for q in model.bins]
        assert int(index[b, y, x]) == int(np.argmin(distances))
    lightness = torch.tensor([0.0, 1.99, 2.0, 50.0, 99.99, 100.0]).view(1, 1, 1, 6)
    assert l_labels(lightness, 50).tolist() == [[[0, 0, 1, 25, 49, 49]]]
    half = model.backbone.l_net(torch.zeros(2, 1, 16, 16)).shape[1]
    assert half == 8 * tiny_backbone("split_brain").width // 2, "each half has half the width"
    model.eval()
    assert model.embed(images).shape == (BATCH, 2 * half)


def test_relative_loc_patches_never_touch_and_features_are_read_on_patches():
    from methods.config import ConfigError, build
    from methods.patches import centred_grid, crop_patches
    from methods.relative_loc import RelativeLocConfig
    with pytest.raises(ConfigError, match="method.gap: 2 px with jitter 1 px lets"):
        build(RelativeLocConfig, {"gap": 2, "jitter": 1}, "method")
    model, _, cfg = make("relative_loc")
    model.eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    corners = centred_grid(2, 32, cfg.patch_size, cfg.gap)
    patches = crop_patches(images, corners, cfg.patch_size).flatten(0, 1)  # (2 * 9, 3, p, p)
    with torch.no_grad():
        expected = model.backbone(normalize(patches)).view(2, 9, -1).mean(1)
    torch.testing.assert_close(model.embed(images), expected)
