"""methods/augment.py against torchvision.transforms.v2.functional applied image by image.

The batched ops must give each image what the naive per-image torchvision call with the same
parameters gives; the samplers must follow torchvision's distributions, give each image its own
draw, be reproducible from a seed, and leave unselected images untouched.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from methods import augment as A

TOL = 1e-5  # float32 rounding of differently ordered arithmetic, far below one uint8 level (0.004)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int = 6, height: int = 11, width: int = 13, seed: int = 0) -> torch.Tensor:
    """Random RGB in [0, 1]; the first half quantised to eighths so channels tie (max == min,
    two equal maxima), plus pure black and white pixels: the edge cases of HSV and clamping."""
    images = torch.rand(batch, 3, height, width, generator=_gen(seed))  # (B, 3, H, W)
    half = batch // 2
    images[:half] = (images[:half] * 8).round() / 8
    images[:, :, 0, 0] = 0.0
    images[:, :, 0, 1] = 1.0
    images[:, :, 0, 2] = 0.5
    return images


def _reference(fn, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(image, param.item()) for image, param in zip(images, params)])


COLOUR_OPS = {
    "brightness": (A.adjust_brightness, TF.adjust_brightness, (0.0, 2.0)),
    "contrast": (A.adjust_contrast, TF.adjust_contrast, (0.0, 2.0)),
    "saturation": (A.adjust_saturation, TF.adjust_saturation, (0.0, 2.0)),
    "hue": (A.adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
}


@pytest.mark.parametrize("name", COLOUR_OPS)
def test_colour_ops_match_torchvision_per_image(name):
    ours, theirs, bounds = COLOUR_OPS[name]
    images = _images(batch=8)
    params = torch.empty(8).uniform_(*bounds, generator=_gen(1))  # (B,) one per image
    params[0], params[1] = bounds  # the ends of the range
    out = ours(images, params)
    torch.testing.assert_close(out, _reference(theirs, images, params), atol=TOL, rtol=0)


def test_grayscale_matches_torchvision():
    images = _images()
    expected = torch.stack([TF.rgb_to_grayscale(image, num_output_channels=3) for image in images])
    torch.testing.assert_close(A.grayscale(images), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_gaussian_blur_matches_torchvision_per_image(kernel_size):
    images = _images(height=10, width=13)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 3.0])  # (B,)
    expected = torch.stack([TF.gaussian_blur(image, [kernel_size] * 2, [sigma.item()] * 2)
                            for image, sigma in zip(images, sigmas)])
    out = A.gaussian_blur(images, sigmas, kernel_size)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def test_gaussian_blur_rejects_bad_kernel_sizes():
    images = _images(height=5, width=5)
    with pytest.raises(ValueError, match="odd"):
        A.gaussian_blur(images, torch.ones(6), 4)
    with pytest.raises(ValueError, match="below the image side"):
        A.gaussian_blur(images, torch.ones(6), 11)


def test_default_blur_kernel_is_a_tenth_of_the_side_and_odd():
    assert [A.default_blur_kernel_size(side) for side in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]


def test_solarize_matches_torchvision_on_selected_images():
    images = _images()
    mask = torch.tensor([True, False, True, True, False, True])
    expected = torch.stack([TF.solarize(image, 0.4) if selected else image
                            for image, selected in zip(images, mask)])
    assert torch.equal(A.solarize(images, 0.4, mask), expected)


def test_hflip_matches_torchvision_on_selected_images():
    images = _images()
    mask = torch.tensor([True, False, False, True, True, False])
    expected = torch.stack([TF.horizontal_flip(image) if selected else image
                            for image, selected in zip(images, mask)])
    assert torch.equal(A.hflip(images, mask), expected)


def test_rotate90_matches_torch_rot90_per_image():
    images = _images(batch=7, height=9, width=9)
    k = torch.tensor([0, 1, 2, 3, 4, -1, 7])
    expected = torch.stack([torch.rot90(image, int(quarters), dims=(-2, -1))
                            for image, quarters in zip(images, k)])
    assert torch.equal(A.rotate90(images, k), expected)


def test_rotate90_needs_square_images_only_for_odd_turns():
    images = _images(batch=2, height=5, width=7)
    assert torch.equal(A.rotate90(images, torch.tensor([2, 0]))[0], images[0].flip(-1).flip(-2))
    with pytest.raises(ValueError, match="square"):
        A.rotate90(images, torch.tensor([1, 0]))


def _tv_resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    crops = []
    for image, (x0, y0, x1, y1) in zip(images, boxes.long().tolist()):
        crops.append(TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size],
                                     interpolation=T.InterpolationMode.BILINEAR, antialias=False))
    return torch.stack(crops)


def test_crop_resize_of_the_whole_image_matches_torchvision_resize():
    images = _images(height=12, width=15)
    boxes = torch.tensor([[0.0, 0.0, 15.0, 12.0]]).repeat(6, 1)
    out = A.crop_resize(images, boxes, 20)
    torch.testing.assert_close(out, _tv_resized_crop(images, boxes, 20), atol=TOL, rtol=0)


def test_crop_resize_matches_torchvision_resized_crop_inside_the_box():
    # Upscaling boxes of side >= size / 2. Output pixel centres sample the same points as
    # resized_crop(antialias=False); only the outermost output row and column differ: their
    # samples fall within half a pixel outside the box, where roi_align interpolates with the
    # image's next pixel and resized_crop (which sees only the crop) repeats the edge pixel.
    images = _images(batch=4, height=16, width=16)
    boxes = torch.tensor([[2.0, 3.0, 12.0, 11.0], [5.0, 1.0, 14.0, 15.0],
                          [0.0, 0.0, 8.0, 16.0], [6.0, 6.0, 16.0, 16.0]])  # (B, 4) x0 y0 x1 y1
    out = A.crop_resize(images, boxes, 16)
    expected = _tv_resized_crop(images, boxes, 16)
    assert out.shape == (4, 3, 16, 16)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=TOL, rtol=0)


def test_crop_resize_antialiases_when_shrinking():
    # Boxes three times the output side: each output pixel averages its 3 x 3 source pixels
    # (bilinear samples at their centres), where resized_crop(antialias=False) would keep only
    # the middle one and alias.
    images = _images(batch=3, height=16, width=16)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [2.0, 4.0, 14.0, 16.0], [4.0, 1.0, 16.0, 13.0]])
    crops = torch.stack([images[0, :, 0:12, 0:12], images[1, :, 4:16, 2:14],
                         images[2, :, 1:13, 4:16]])  # (B, 3, 12, 12)
    out = A.crop_resize(images, boxes, 4)
    torch.testing.assert_close(out, F.avg_pool2d(crops, 3), atol=TOL, rtol=0)


def _box_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # w, h


def test_crop_boxes_lie_inside_and_follow_the_requested_ranges():
    height, width, scale, ratio = 30, 40, (0.1, 0.6), (0.5, 2.0)
    boxes = A.sample_crop_boxes(2000, height, width, scale, ratio, generator=_gen())  # (B, 4)
    assert boxes.shape == (2000, 4) and torch.equal(boxes, boxes.round())
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    w, h = _box_sizes(boxes)
    assert (w > 0).all() and (h > 0).all()
    # w and h are rounded from sqrt(area * ratio) and sqrt(area / ratio): bound by +-0.5 each
    area = height * width
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    # every image gets its own box: sizes and positions spread over the allowed range
    assert len(set(map(tuple, boxes.tolist()))) > 1500
    assert boxes[:, 0].min() == 0 and (boxes[:, 2] == width).any()


def test_crop_boxes_follow_torchvision_distribution():
    height, width, scale, ratio = 24, 24, (0.08, 1.0), (3 / 4, 4 / 3)
    ours = A.sample_crop_boxes(3000, height, width, scale, ratio, generator=_gen())
    with torch.random.fork_rng():  # torchvision's get_params draws from the global generator
        torch.manual_seed(0)
        params = [T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale),
                                                 list(ratio)) for _ in range(3000)]
    theirs = torch.tensor([[j, i, j + w, i + h] for i, j, h, w in params], dtype=torch.float64)
    for stat in (lambda b: _box_sizes(b)[0] * _box_sizes(b)[1] / (height * width),
                 lambda b: (_box_sizes(b)[0] / _box_sizes(b)[1]).log(),
                 lambda b: b[:, 0] + b[:, 2]):  # area fraction, log aspect, horizontal centre
        # 0.1 std is about 4 standard errors of a difference of two means of 3000 draws
        assert abs(stat(ours).mean() - stat(theirs).mean()) < 0.1 * stat(theirs).std()


def test_crop_boxes_fall_back_to_torchvisions_centre_crop():
    # aspect ratios 3..4 never fit a square image, so all 10 tries fail
    boxes = A.sample_crop_boxes(5, 32, 32, (0.9, 1.0), (3.0, 4.0), generator=_gen())
    i, j, h, w = T.RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.9, 1.0], [3.0, 4.0])
    assert boxes.tolist() == [[j, i, j + w, i + h]] * 5


RANDOM_OPS = {
    "resized_crop": lambda x, g: A.random_resized_crop(x, 8, generator=g),
    "hflip": lambda x, g: A.random_hflip(x, 0.5, generator=g),
    "color_jitter": lambda x, g: A.color_jitter(x, 0.8, 0.8, 0.8, 0.2, 0.8, generator=g),
    "grayscale": lambda x, g: A.random_grayscale(x, 0.5, generator=g),
    "gaussian_blur": lambda x, g: A.random_gaussian_blur(x, 0.5, generator=g),
    "solarize": lambda x, g: A.random_solarize(x, 0.5, generator=g),
}


@pytest.mark.parametrize("name", RANDOM_OPS)
def test_random_ops_are_reproducible_and_keep_shape_dtype_and_range(name):
    images = _images(batch=16, height=12, width=12)
    out = RANDOM_OPS[name](images, _gen(3))
    size = 8 if name == "resized_crop" else 12
    assert out.shape == (16, 3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, RANDOM_OPS[name](images, _gen(3)))
    assert not torch.equal(out, RANDOM_OPS[name](images, _gen(4)))
    assert torch.equal(images, _images(batch=16, height=12, width=12))  # input not modified


SELECTED_OPS = {
    "hflip": lambda x, p, g: A.random_hflip(x, p, generator=g),
    "color_jitter": lambda x, p, g: A.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p, generator=g),
    "grayscale": lambda x, p, g: A.random_grayscale(x, p, generator=g),
    # sigma >= 0.5: below about 0.17 a 3-tap kernel is the identity in float32
    "gaussian_blur": lambda x, p, g: A.random_gaussian_blur(x, p, (0.5, 2.0), generator=g),
    "solarize": lambda x, p, g: A.random_solarize(x, p, generator=g),
}


def _changed(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return (out != images).flatten(1).any(1)  # (B,)


@pytest.mark.parametrize("name", SELECTED_OPS)
def test_probability_selects_which_images_change(name):
    images = torch.rand(64, 3, 10, 10, generator=_gen(5))
    op = SELECTED_OPS[name]
    assert torch.equal(op(images, 0.0, _gen()), images)
    assert _changed(op(images, 1.0, _gen()), images).all()
    changed = _changed(op(images, 0.5, _gen()), images)
    assert 10 < changed.sum() < 54


def test_probability_outside_unit_interval_is_an_error():
    with pytest.raises(ValueError, match="p must lie in"):
        A.random_hflip(_images(), 1.5, generator=_gen())


ALWAYS_APPLIED_OPS = {
    "resized_crop": lambda x, g: A.random_resized_crop(x, 8, generator=g),
    "color_jitter": lambda x, g: A.color_jitter(x, 0.8, 0.8, 0.8, 0.2, 1.0, generator=g),
    "gaussian_blur": lambda x, g: A.random_gaussian_blur(x, 1.0, generator=g),
}


@pytest.mark.parametrize("name", ALWAYS_APPLIED_OPS)
def test_each_image_gets_its_own_parameters(name):
    images = _images(batch=1, height=32, width=32).repeat(16, 1, 1, 1)  # 16 copies of one image
    out = ALWAYS_APPLIED_OPS[name](images, _gen())
    assert len({tuple(image.flatten().tolist()) for image in out}) == 16


def test_color_jitter_brightness_factors_span_their_range_per_image():
    grey = torch.full((400, 3, 2, 2), 0.5)
    out = A.color_jitter(grey, 0.4, 0.0, 0.0, 0.0, 1.0, generator=_gen())
    factors = out[:, 0, 0, 0] / 0.5  # (B,)
    assert factors.min() >= 0.6 - TOL and factors.max() <= 1.4 + TOL
    assert factors.min() < 0.65 and factors.max() > 1.35 and abs(factors.mean() - 1.0) < 0.05


def test_color_jitter_rejects_out_of_range_strengths():
    with pytest.raises(ValueError, match="hue in"):
        A.color_jitter(_images(), 0.4, 0.4, 0.4, 0.6, generator=_gen())


def test_color_jitter_is_the_fixed_order_torchvision_chain_with_sampled_parameters():
    images = _images(batch=12)
    out = A.color_jitter(images, 0.8, 0.8, 0.8, 0.2, 0.7, generator=_gen(2))
    mask, params = A.sample_color_jitter(12, 0.8, 0.8, 0.8, 0.2, 0.7, generator=_gen(2))
    assert 0 < mask.sum() < 12 and params.shape == (12, 4)
    for image, result, selected, (b, c, s, h) in zip(images, out, mask, params.tolist()):
        if not selected:
            assert torch.equal(result, image)
            continue
        expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(
            TF.adjust_brightness(image, b), c), s), h)
        torch.testing.assert_close(result, expected, atol=TOL, rtol=0)


def test_color_jitter_parameters_cover_simclrs_ranges():
    mask, params = A.sample_color_jitter(2000, 0.8, 0.4, 1.5, 0.2, 0.8, generator=_gen())
    low = torch.tensor([0.2, 0.6, 0.0, -0.2])
    high = torch.tensor([1.8, 1.4, 2.5, 0.2])
    assert (params >= low).all() and (params <= high).all()
    assert ((params.amin(0) - low).abs() < 0.01).all()
    assert ((params.amax(0) - high).abs() < 0.01).all()
    assert abs(mask.float().mean() - 0.8) < 0.03


def test_uint8_round_trip_and_rounding():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(A.to_uint8(A.to_float(pixels)), pixels)
    assert A.to_float(pixels).dtype == torch.float32 and A.to_float(pixels).max() == 1.0
    values = torch.tensor([-0.2, 0.0, 0.3 / 255, 0.7 / 255, 1.0, 1.3])
    assert A.to_uint8(values).tolist() == [0, 0, 0, 1, 255, 255]


def test_large_images_are_processed_in_chunks_with_per_image_parameters():
    # more pixels than one chunk: chunk boundaries must not change any image's result
    side = math.isqrt(A.CHUNK_PIXELS) // 2 + 1  # 3 images per chunk
    images = torch.rand(7, 3, side, side, generator=_gen(7))
    mask = torch.tensor([True, False, True, True, False, False, True])
    _, params = A.sample_color_jitter(7, 0.8, 0.8, 0.8, 0.5, generator=_gen())
    out = A.apply_color_jitter(images, mask, params)
    expected = torch.cat([A.apply_color_jitter(image[None], selected[None], param[None])
                          for image, selected, param in zip(images, mask, params)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
