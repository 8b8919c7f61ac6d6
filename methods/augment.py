"""Batched image augmentations with independent random parameters per image.

torchvision's v2 transforms draw one set of random parameters per call, so on a batch tensor every
image gets the same crop, flip and jitter, and calling them image by image costs a Python round trip
per image. Here a sampler draws B parameter sets at once and each op applies them as whole-batch
tensor operations. Each deterministic op matches `torchvision.transforms.v2.functional` applied
image by image (tests/methods/test_augment.py); `crop_resize` documents its two intended
differences. Large images go through in cache-sized chunks of whole images (`_where_selected`).

The recipe is SimCLR's (Chen et al., 2020, arXiv:2002.05709, appendix A): random resized crop,
horizontal flip, colour jitter, random grayscale, Gaussian blur. Solarisation is BYOL's (Grill et
al., 2020, arXiv:2006.07733), also used by DINO (Caron et al., 2021, arXiv:2104.14294); rotations by
multiples of 90 degrees are RotNet's (Gidaris et al., 2018, arXiv:1803.07728).

Images are float (B, C, H, W) in [0, 1], RGB. Every `random_*` / `sample_*` function takes a
keyword-only `generator` and draws all its randomness from it, so a seeded generator reproduces a
batch exactly; the deterministic ops take their parameters explicitly. The amount drawn from the
generator depends only on the batch size, never on the values drawn.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many boxes before the centre crop
# Cache blocking: 2^16 pixels are 0.75 MB of float32 RGB, so a chunk and the temporaries of an op
# stay in cache (measured best for hue and jitter at 32-224 px on a 1 MB-L2 CPU).
CHUNK_PIXELS = 1 << 16


def _uniform(shape: int | tuple[int, ...], low: float, high: float, generator: torch.Generator,
             device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    draws = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    return draws.to(device).mul_(high - low).add_(low)


def _bernoulli(batch: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return _uniform(batch, 0.0, 1.0, generator, device) < p  # (B,) bool


def _all_images(images: Tensor) -> Tensor:
    return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)  # (B,)


def _where_selected(images: Tensor, mask: Tensor,
                    fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """`fn(selected_images, index)` on the images where `mask` (B,) is set, the others copied.

    `fn` must keep the shape; `index` holds the selected images' positions in the whole batch (for
    their parameters). The batch goes through in chunks of about CHUNK_PIXELS pixels so that the
    many elementwise passes of an op run on data that stays in the CPU cache.
    """
    batch, _, height, width = images.shape
    step = max(1, CHUNK_PIXELS // (height * width))
    mask = mask.to(images.device)
    output = torch.empty_like(images)
    for start in range(0, batch, step):
        chunk, out = images[start:start + step], output[start:start + step]
        index = mask[start:start + step].nonzero().squeeze(1)  # (S,)
        if index.numel() == chunk.shape[0]:
            out.copy_(fn(chunk, index + start))
            continue
        out.copy_(chunk)
        if index.numel():
            out[index] = fn(chunk[index], index + start)
    return output


# ---------------------------------------------------------------- crops and flips

def sample_crop_boxes(batch: int, height: int, width: int,
                      scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3), *,
                      generator: torch.Generator) -> Tensor:
    """RandomResizedCrop boxes (x0, y0, x1, y1) in pixels, (B, 4) float64, integer-valued.

    As torchvision: up to 10 tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio)
    with w, h rounded; the first box that fits is placed uniformly, else the centre crop clipped to
    `ratio`. The tries run for the whole batch at once.
    """
    if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                         f"got scale={scale}, ratio={ratio}")
    cpu = torch.device("cpu")
    shape = (batch, CROP_TRIES)
    area = _uniform(shape, *scale, generator, cpu, torch.float64) * (height * width)  # (B, T)
    aspect = _uniform(shape, math.log(ratio[0]), math.log(ratio[1]), generator, cpu,
                      torch.float64).exp_()  # (B, T)
    offset_draws = _uniform((batch, 2), 0.0, 1.0, generator, cpu, torch.float64)  # (B, 2)
    w = (area * aspect).sqrt_().round_()  # (B, T)
    h = (area / aspect).sqrt_().round_()  # (B, T)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, T)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # (B, 1) first fitting try
    w = w.gather(1, first).squeeze(1)  # (B,)
    h = h.gather(1, first).squeeze(1)  # (B,)
    x0 = (offset_draws[:, 0] * (width - w + 1)).floor_().clamp_(max=width - w)
    y0 = (offset_draws[:, 1] * (height - h + 1)).floor_().clamp_(max=height - h)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], 1)  # (B, 4)
    fallback = ~fits.any(1)  # (B,)
    boxes[fallback] = torch.tensor(_centre_box(height, width, ratio), dtype=boxes.dtype)
    return boxes


def _centre_box(height: int, width: int, ratio: tuple[float, float]) -> list[float]:
    """torchvision's fallback: the whole image, clipped to the aspect ratio range, centred."""
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    x0, y0 = (width - w) // 2, (height - h) // 2
    return [x0, y0, x0 + w, y0 + h]


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop box b (x0, y0, x1, y1) of image b and resize it bilinearly to size x size.

    One `roi_align` call (aligned=True: pixel k covers [k, k+1)); output pixel centres sample the
    box at the same points as `resized_crop(..., antialias=False)`. Two differences, both intended:
    samples within half a pixel of the box edge interpolate with the image's pixels just outside
    the box (the crop is a window on the image, not a separate picture), and when the box is
    larger than the output each output pixel averages ceil(box / size)^2 bilinear samples, which
    anti-aliases the downscale.
    """
    index = torch.arange(images.shape[0], dtype=images.dtype, device=images.device)
    rois = torch.cat([index[:, None], boxes.to(images)], 1)  # (B, 5)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                     aligned=True)  # (B, C, size, size)


def random_resized_crop(images: Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), *,
                        generator: torch.Generator) -> Tensor:
    """A RandomResizedCrop box per image (`sample_crop_boxes`), resized to size x size."""
    batch, _, height, width = images.shape
    boxes = sample_crop_boxes(batch, height, width, scale, ratio, generator=generator)
    return crop_resize(images, boxes, size)


def hflip(images: Tensor, flip_mask: Tensor) -> Tensor:
    """Mirror left-right the images where `flip_mask` (B,) bool is set."""
    return _where_selected(images, flip_mask, lambda selected, _: selected.flip(-1))


def random_hflip(images: Tensor, p: float = 0.5, *, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability p."""
    return hflip(images, _bernoulli(images.shape[0], p, generator, images.device))


def rotate90(images: Tensor, k: Tensor) -> Tensor:
    """Rotate image b by k[b] quarter turns as `torch.rot90(image, k, dims=(-2, -1))`."""
    quarters = k.to(images.device).remainder(4)  # (B,)
    if images.shape[-2] != images.shape[-1] and bool((quarters % 2 == 1).any()):
        raise ValueError(f"odd quarter turns need square images, got {tuple(images.shape[-2:])}")
    rotated = torch.empty_like(images)
    for quarter in range(4):  # four groups, not a loop over images
        index = (quarters == quarter).nonzero().squeeze(1)
        if index.numel():
            rotated[index] = torch.rot90(images[index], quarter, dims=(-2, -1))
    return rotated


# ---------------------------------------------------------------- colour

def _per_image(values: Tensor, images: Tensor) -> Tensor:
    return values.to(images).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def _luma(images: Tensor) -> Tensor:
    red, green, blue = images.unbind(1)
    return red.mul(LUMA[0]).add_(green, alpha=LUMA[1]).add_(blue, alpha=LUMA[2]).unsqueeze(1)


def _brightness(images: Tensor, factors: Tensor) -> Tensor:
    return images.mul(_per_image(factors, images)).clamp_(0.0, 1.0)


def _contrast(images: Tensor, factors: Tensor) -> Tensor:
    mean = images.mean(dim=(2, 3)) @ images.new_tensor(LUMA)  # (B,) mean luma
    factors = _per_image(factors, images)
    return images.mul(factors).add_(_per_image(mean, images) * (1.0 - factors)).clamp_(0.0, 1.0)


def _saturation(images: Tensor, factors: Tensor) -> Tensor:
    factors = _per_image(factors, images)
    return images.mul(factors).add_(_luma(images).mul_(1.0 - factors)).clamp_(0.0, 1.0)


def _hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotate the HSV hue by shifts (B,) turns, branch-free (torch.where is slow on CPU).

    Rotating the hue keeps each pixel's max and chroma = max - min, and the HSV -> RGB formula for
    channel n = (5, 3, 1) of (R, G, B) is min + chroma * clamp(|(n + 6 hue) mod 6 - 2| - 1, 0, 1).
    """
    red, green, blue = images.unbind(1)  # each (B, H, W)
    low = torch.minimum(torch.minimum(red, green), blue)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - low
    # 0/1 masks of the channel holding the max, red before green before blue (as torchvision)
    is_red = torch.ge(red, value, out=torch.empty_like(value))
    is_green = torch.ge(green, value, out=torch.empty_like(value)).mul_(1.0 - is_red)
    is_blue = (1.0 - is_red).sub_(is_green)
    # 6 * hue * chroma: (G - B), 2 chroma + (B - R) or 4 chroma + (R - G) by the max channel
    sextant = (green - blue).mul_(is_red)
    sextant.addcmul_(torch.add(blue - red, chroma, alpha=2.0), is_green)
    sextant.addcmul_(torch.add(red - green, chroma, alpha=4.0), is_blue)
    sextant.div_(chroma.clamp_min(torch.finfo(images.dtype).tiny))  # grey pixels: 0 / tiny = 0
    # centred phase z = (n - 2 + 6 hue) wrapped to [-3, 3], per channel: (B, 3, H, W)
    phases = images.new_tensor([3.0, 1.0, -1.0]) + 6.0 * shifts.to(images)[:, None]  # (B, 3)
    phase = sextant.unsqueeze(1) + phases[:, :, None, None]
    phase.sub_(phase.mul(1.0 / 6.0).round_().mul_(6.0))
    ramp = phase.abs_().sub_(1.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1)).add_(low.unsqueeze(1))


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Scale image b by factors[b] (B,), clamped to [0, 1]."""
    factors = factors.to(images)  # (B,)
    return _where_selected(images, _all_images(images), lambda x, i: _brightness(x, factors[i]))


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Blend image b with its mean luma: factors[b] * image + (1 - factors[b]) * mean."""
    factors = factors.to(images)  # (B,)
    return _where_selected(images, _all_images(images), lambda x, i: _contrast(x, factors[i]))


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Blend image b with its luma image: factors[b] * image + (1 - factors[b]) * luma."""
    factors = factors.to(images)  # (B,)
    return _where_selected(images, _all_images(images), lambda x, i: _saturation(x, factors[i]))


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Rotate the HSV hue of image b by shifts[b] (B,) turns, shifts in [-0.5, 0.5]."""
    shifts = shifts.to(images)  # (B,)
    return _where_selected(images, _all_images(images), lambda x, i: _hue(x, shifts[i]))


def grayscale(images: Tensor) -> Tensor:
    """ITU-R 601-2 luma, replicated to 3 channels: (B, 3, H, W)."""
    return _luma(images).repeat(1, 3, 1, 1)


def random_grayscale(images: Tensor, p: float = 0.2, *, generator: torch.Generator) -> Tensor:
    """`grayscale` each image with probability p (SimCLR: p = 0.2)."""
    mask = _bernoulli(images.shape[0], p, generator, images.device)
    return _where_selected(images, mask, lambda selected, _: grayscale(selected))


def sample_color_jitter(batch: int, brightness: float, contrast: float, saturation: float,
                        hue: float, p: float = 0.8, *,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which images to jitter, (B,) bool with probability p, and their parameters (B, 4):
    brightness, contrast and saturation factors ~ U[max(0, 1 - s), 1 + s], hue shift ~ U[-hue, hue].
    """
    if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
        raise ValueError("brightness, contrast, saturation must be >= 0 and hue in [0, 0.5], "
                         f"got {brightness}, {contrast}, {saturation}, {hue}")
    device = generator.device
    mask = _bernoulli(batch, p, generator, device)
    params = [_uniform(batch, max(0.0, 1.0 - s), 1.0 + s, generator, device)
              for s in (brightness, contrast, saturation)]
    params.append(_uniform(batch, -hue, hue, generator, device))
    return mask, torch.stack(params, 1)  # (B,), (B, 4)


def apply_color_jitter(images: Tensor, mask: Tensor, params: Tensor) -> Tensor:
    """Adjust brightness, contrast, saturation, then hue by `params` (B, 4) of the images where
    `mask` (B,) is set; the others are returned unchanged. Columns at their identity are skipped."""
    identity = params.new_tensor([1.0, 1.0, 1.0, 0.0])
    steps = [(adjust, params[:, column].to(images.device))
             for column, adjust in enumerate((_brightness, _contrast, _saturation, _hue))
             if not bool((params[:, column] == identity[column]).all())]

    def jitter(selected: Tensor, index: Tensor) -> Tensor:
        for adjust, values in steps:
            selected = adjust(selected, values[index])
        return selected

    return _where_selected(images, mask, jitter)


def color_jitter(images: Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float, p: float = 0.8, *, generator: torch.Generator) -> Tensor:
    """SimCLR's colour jitter (strength 1: 0.8, 0.8, 0.8, 0.2 with p = 0.8), per image.

    Each image is jittered with probability p, with its own factors (`sample_color_jitter`).
    torchvision's ColorJitter shuffles the order of the four adjustments on every call; a batch
    needs one order, so the order here is fixed: brightness, contrast, saturation, hue.
    """
    mask, params = sample_color_jitter(images.shape[0], brightness, contrast, saturation, hue, p,
                                       generator=generator)
    return apply_color_jitter(images, mask, params)


# ---------------------------------------------------------------- blur and solarisation

def default_blur_kernel_size(side: int) -> int:
    """SimCLR's kernel: 10% of the image side, made odd, at least 3."""
    size = max(3, int(0.1 * side))
    return size + 1 - size % 2


def gaussian_kernels(sigmas: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels, one per sigma: (B,) -> (B, kernel_size)."""
    offsets = torch.arange(kernel_size, dtype=sigmas.dtype, device=sigmas.device)
    offsets = offsets - (kernel_size - 1) / 2  # (K,)
    return (offsets / sigmas[:, None]).square_().mul_(-0.5).softmax(1)  # (B, K)


def _check_kernel_size(kernel_size: int, height: int, width: int) -> None:
    if kernel_size % 2 == 0 or kernel_size < 1 or kernel_size // 2 >= min(height, width):
        raise ValueError(f"kernel_size must be odd, positive and below the image side "
                         f"{min(height, width)}, got {kernel_size}")


def _blur(images: Tensor, sigmas: Tensor, kernel_size: int) -> Tensor:
    batch, channels, height, width = images.shape
    radius, planes = kernel_size // 2, batch * channels
    kernels = gaussian_kernels(sigmas.to(images), kernel_size).repeat_interleave(channels, 0)
    blurred = images.reshape(1, planes, height, width)
    blurred = F.conv2d(F.pad(blurred, (radius, radius, 0, 0), mode="reflect"),
                       kernels.view(planes, 1, 1, kernel_size), groups=planes)
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"),
                       kernels.view(planes, 1, kernel_size, 1), groups=planes)
    return blurred.view(batch, channels, height, width)


def gaussian_blur(images: Tensor, sigmas: Tensor, kernel_size: int) -> Tensor:
    """Blur image b with an isotropic Gaussian of std sigmas[b] (B,), reflect padding.

    Separable: a horizontal then a vertical 1-D pass, each one depthwise convolution with one
    kernel per (image, channel) plane, so a chunk of the batch is two conv2d calls.
    """
    _check_kernel_size(kernel_size, *images.shape[-2:])
    sigmas = sigmas.to(images)  # (B,)
    return _where_selected(images, _all_images(images),
                           lambda x, i: _blur(x, sigmas[i], kernel_size))


def random_gaussian_blur(images: Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0),
                         kernel_size: int | None = None, *, generator: torch.Generator) -> Tensor:
    """Blur each image with probability p, sigma ~ U(sigma); kernel by default 10% of the side."""
    batch, _, height, width = images.shape
    mask = _bernoulli(batch, p, generator, images.device)
    sigmas = _uniform(batch, *sigma, generator, images.device)  # (B,)
    size = kernel_size or default_blur_kernel_size(min(height, width))
    _check_kernel_size(size, height, width)
    return _where_selected(images, mask, lambda x, i: _blur(x, sigmas[i], size))


def _solarize(images: Tensor, threshold: float) -> Tensor:
    # (1 - x) * m + x * (1 - m) with m in {0, 1} is exact and, unlike torch.where, fast on CPU
    invert = torch.ge(images, threshold, out=torch.empty_like(images))
    return torch.addcmul((1.0 - images).mul_(invert), images, 1.0 - invert)


def solarize(images: Tensor, threshold: float, mask: Tensor) -> Tensor:
    """In the images where `mask` (B,) is set, invert every value >= threshold (x -> 1 - x)."""
    return _where_selected(images, mask, lambda x, _: _solarize(x, threshold))


def random_solarize(images: Tensor, p: float = 0.2, threshold: float = 0.5, *,
                    generator: torch.Generator) -> Tensor:
    """`solarize` each image with probability p (BYOL's second view: p = 0.2, threshold 0.5)."""
    return solarize(images, threshold, _bernoulli(images.shape[0], p, generator, images.device))


def fit_size(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) resized to size x size (bilinear, antialiased), the dtype kept; unchanged
    when already that size. For views that take the whole image rather than a resized crop,
    when images are decoded larger than the training size (`data.decode_size`)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round_().clamp_(0, 255).to(images.dtype) if images.dtype == torch.uint8 else x


# ---------------------------------------------------------------- dtype

def from_hwc(images) -> Tensor:
    """Images (N, H, W, C), NumPy or torch, as the contiguous tensor (N, C, H, W) every method
    takes, dtype kept. Contiguous, not a permuted view: a channels_last input made torch 2.14.1's
    oneDNN convolution backward corrupt the heap at resnet_small's small widths."""
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).contiguous()


def to_float(images: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def to_uint8(images: Tensor) -> Tensor:
    """float in [0, 1] -> uint8, rounded to the nearest level and clamped."""
    return images.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
