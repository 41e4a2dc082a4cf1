"""Pre-training augmentations as batched tensor operations on the training device (torch only).

Two halves, so that loader workers only decode images and exact resume still holds:

1. `draw_parameters` (CPU, in the collator): each image's augmentation is a handful of numbers drawn from
   its own generator, seeded by (seed, epoch, image_id, view), so an image is augmented the same way
   whichever batch, worker or process collates it, and after a resume.
2. `augment` (any device, in the training step): a random resized crop, flips and rotations as one
   per-image affine grid (`F.affine_grid` + `F.grid_sample`), then colour jitter and Gaussian blur, all
   vectorised over the batch. Images stay on the device; nothing is decoded or resized twice.

Colour changes are mild by default: colour is diagnostic for skin lesions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Columns of the (N, K) parameter tensor.
PARAMETERS = ("center_x", "center_y", "width", "height", "flip_x", "flip_y", "angle", "brightness", "contrast",
              "saturation", "hue", "blur_sigma")
_INDEX = {name: i for i, name in enumerate(PARAMETERS)}


@dataclass
class AugmentationConfig:
    """Pre-training augmentations.

    Args:
        crop_scale: area fraction range of the random resized crop.
        crop_ratio: aspect ratio range of the random resized crop.
        flip_p: probability of each of the horizontal and the vertical flip.
        rotate90: rotate by a random multiple of 90 degrees (lesions have no canonical orientation).
        max_degrees: extra rotation, uniform in [-max_degrees, max_degrees]; outside the image is mirrored.
        jitter_p: probability of applying the colour jitter.
        brightness, contrast, saturation: jitter strengths; factors uniform in [1 - s, 1 + s].
        hue: hue rotation, uniform in [-hue, hue] of a full turn.
        blur_p: probability of a Gaussian blur (0 = off).
        blur_sigma: range of the blur's standard deviation, in output pixels.
    """

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotate90: bool = True
    max_degrees: float = 15.0
    jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)

    def is_identity(self) -> bool:
        return (self.crop_scale == (1.0, 1.0) and self.crop_ratio == (1.0, 1.0) and self.flip_p == 0 and not self.rotate90
                and self.max_degrees == 0 and self.jitter_p == 0 and self.blur_p == 0)


# Named presets (`pretrain.py --augmentation`). `geometric` keeps what the metadata measures (size within a
# few percent, colour exactly): only flips, rotations and a slight zoom.
AUGMENTATIONS = {
    "default": AugmentationConfig(),
    "geometric": AugmentationConfig(crop_scale=(0.8, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0),
    "none": AugmentationConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, rotate90=False, max_degrees=0.0,
                               jitter_p=0.0),
}


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=generator).item() < p


def draw_parameters(config: AugmentationConfig, generator: torch.Generator, aspect: float = 1.0) -> list[float]:
    """One image's augmentation: `len(PARAMETERS)` numbers (see `augment`), drawn in a fixed order.

    The crop follows torchvision's RandomResizedCrop sampling (10 tries, then the largest centred box
    with an aspect ratio inside `crop_ratio`) on an image of width / height `aspect`; coordinates are
    fractions of the image's half-width / half-height, centred at 0. Every draw is made whether or not
    its augmentation applies, so one image's stream never depends on another's.
    """
    width, height = aspect, 1.0  # image area = aspect; only ratios matter
    log_ratio = (math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    box = None
    for _ in range(10):
        area = width * height * _uniform(generator, *config.crop_scale)
        ratio = math.exp(_uniform(generator, *log_ratio))
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        u, v = _uniform(generator, 0, 1), _uniform(generator, 0, 1)
        if box is None and 0 < w <= width and 0 < h <= height:
            box = ((u * (width - w) + w / 2 - width / 2) / (width / 2), (v * (height - h) + h / 2 - height / 2) / (height / 2),
                   w / width, h / height)
    if box is None:  # no box fits: the largest centred box with an allowed aspect ratio
        ratio = min(max(width / height, config.crop_ratio[0]), config.crop_ratio[1])
        w, h = (width, width / ratio) if ratio > width / height else (height * ratio, height)
        box = (0.0, 0.0, w / width, h / height)
    flip_x = -1.0 if _chance(generator, config.flip_p) else 1.0
    flip_y = -1.0 if _chance(generator, config.flip_p) else 1.0
    quarter_turns = int(torch.randint(0, 4, (), generator=generator)) if config.rotate90 else 0
    angle = quarter_turns * math.pi / 2 + math.radians(_uniform(generator, -config.max_degrees, config.max_degrees))
    jitter = _chance(generator, config.jitter_p)
    factors = [_uniform(generator, max(0.0, 1 - s), 1 + s) for s in (config.brightness, config.contrast, config.saturation)]
    hue = _uniform(generator, -config.hue, config.hue)
    if not jitter:
        factors, hue = [1.0, 1.0, 1.0], 0.0
    blur = _chance(generator, config.blur_p)
    sigma = _uniform(generator, *config.blur_sigma)
    return [*box, flip_x, flip_y, angle, *factors, hue, sigma if blur else 0.0]


def augment(pixels: torch.Tensor, parameters: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Augment a batch on its device.

    Args:
        pixels: (N, 3, H, W) images, uint8 or float on the 0-255 scale.
        parameters: (N, K) from `draw_parameters`, on any device.
        size: output (height, width).

    Returns:
        (N, 3, *size) float32 on the 0-255 scale.
    """
    x = pixels.float()
    p = parameters.to(device=x.device, dtype=torch.float32)
    n, _, in_h, in_w = x.shape
    out_h, out_w = size
    col = lambda name: p[:, _INDEX[name]]  # noqa: E731
    # Output pixel (u, v) in [-1, 1]^2 -> crop-local offset -> flipped, rotated about the crop centre -> input.
    # Work in input half-pixels so that rotation is a rotation also for non-square images.
    half_w, half_h = in_w / 2, in_h / 2
    scale_x = col("width") * half_w * col("flip_x")  # (N,) half-extent of the crop, in input pixels
    scale_y = col("height") * half_h * col("flip_y")
    cos, sin = torch.cos(col("angle")), torch.sin(col("angle"))
    theta = torch.stack([
        torch.stack([cos * scale_x / half_w, -sin * scale_y / half_w, col("center_x")], dim=-1),
        torch.stack([sin * scale_x / half_h, cos * scale_y / half_h, col("center_y")], dim=-1),
    ], dim=1)  # (N, 2, 3)
    grid = F.affine_grid(theta, (n, 3, out_h, out_w), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = color_jitter(x, col("brightness"), col("contrast"), col("saturation"), col("hue"))
    return gaussian_blur(x, col("blur_sigma")).clamp(0, 255)


_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)  # (N, 1, H, W)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors (N,) and a hue rotation (N,) in turns, on
    (N, 3, H, W) 0-255 images; factor 1 and hue 0 leave an image unchanged. Hue turns the chroma in YIQ space."""
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    x = (x * view(brightness)).clamp(0, 255)
    mean = _grey(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * view(contrast) + mean).clamp(0, 255)
    grey = _grey(x)
    x = ((x - grey) * view(saturation) + grey).clamp(0, 255)
    rgb_to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                              device=x.device, dtype=x.dtype)
    yiq = torch.einsum("ij,njhw->nihw", rgb_to_yiq, x)
    angle = 2 * math.pi * hue
    cos, sin = view(torch.cos(angle)), view(torch.sin(angle))
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(rgb_to_yiq), yiq).clamp(0, 255)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image standard deviation (N,) in pixels (0: unchanged)."""
    if not bool((sigma > 0).any()):
        return x
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), h - 1, w - 1))  # reflect padding needs radius < size
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe = sigma.clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = torch.where((sigma > 0).view(-1, 1), kernel, (offsets == 0).to(x.dtype).expand_as(kernel))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


__all__ = ["AugmentationConfig", "AUGMENTATIONS", "PARAMETERS", "draw_parameters", "augment", "color_jitter", "gaussian_blur"]
