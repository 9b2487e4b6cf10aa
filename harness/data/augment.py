"""Batched, on-device augmentation: every view of a batch is made by a few tensor operations.

The images stay uint8 ``(B, C, H, W)`` on their device; each call stacks the requested views into
one ``(V*B, C, H', W')`` float batch and applies, with per-sample random parameters drawn in one
call from the generator:

1. random resized crop and horizontal flip, as one axis-aligned affine grid + ``grid_sample``
   (the flip is a negative x scale, so it costs nothing; the compiled stage interpolates the same
   samples per axis, rows by gathers and columns by a batched matrix product);
2. Gaussian blur, a separable filter with a per-sample sigma (delta kernel when not drawn);
3. colour jitter: brightness, contrast, saturation, hue (identity factors when not drawn);
4. random grayscale (colour images);
5. solarization;
6. normalization.

The order is the seed notebook's (crop, blur, jitter) for every recipe; the jitter runs in the fixed
order brightness, contrast, saturation, hue instead of torchvision's random order (the first three
commute exactly when no value is clipped). :class:`ViewRecipe` holds one view's parameters; the
recipe functions map the single ``strength`` knob onto them (table in docs/DATA.md).
"""

from __future__ import annotations

import functools
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from harness.spec import AUG_PRESETS

__all__ = [
    "BLUR_MIN_SIZE",
    "PRESETS",
    "RECIPES",
    "ViewRecipe",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augment",
    "blur_kernel_size",
    "compiled_augmentation",
    "crop_grid",
    "gaussian_blur",
    "local_recipe",
    "make_views",
    "multi_crop",
    "normalize",
    "rgb_to_grayscale",
    "solarize",
    "two_views",
    "use_compiled_augmentation",
    "view_recipes",
]

RECIPES: tuple[str, ...] = ("simclr", "byol", "multicrop")
# ``seed``: the seed notebook's 28-px recipe at every resolution (crop area from 0.8 at s = 1, blur
# at every size). ``paper``: the papers' recipes by resolution (crop area from 0.08, blur only from
# BLUR_MIN_SIZE px as SimCLR/solo-learn at 32 vs 96/224; multi-crop globals from DINO's 0.4).
PRESETS: tuple[str, ...] = AUG_PRESETS
BLUR_MIN_SIZE = 96
MAX_STRENGTH = 2.0
# RandomResizedCrop's retries: sample (area, ratio) this many times, keep the first crop that fits.
_CROP_ATTEMPTS = 10
# Luma weights of torchvision's tensor rgb_to_grayscale (ITU-R 601-2 as TensorFlow rounds them).
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ViewRecipe:
    """The random augmentation of one view, with every parameter already scaled by the strength.

    Probabilities are per sample; magnitudes follow torchvision's conventions (jitter factor drawn
    from ``[max(0, 1 - m), 1 + m]``, hue shift from ``[-h, h]`` in turns).
    """

    scale: tuple[float, float] = (1.0, 1.0)
    """Crop area as a fraction of the image area, drawn uniformly."""
    log_ratio: tuple[float, float] = (0.0, 0.0)
    """Log of the crop's aspect ratio (width / height), drawn uniformly."""
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 3
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    """In [0, 1] units: pixels >= threshold are inverted (torchvision's RandomSolarize(128))."""

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"ViewRecipe.scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if self.log_ratio[0] > self.log_ratio[1]:
            raise ValueError(f"ViewRecipe.log_ratio must be (low, high) with low <= high, got {self.log_ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ViewRecipe.{name} must be a probability in [0, 1], got {value}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("ViewRecipe jitter magnitudes must be >= 0 and hue in [0, 0.5]")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"ViewRecipe.blur_kernel must be a positive odd int, got {self.blur_kernel}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewRecipe.blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")

    @property
    def is_identity(self) -> bool:
        """True when the view is the (resized) original image whatever is drawn."""
        return (
            self.scale == (1.0, 1.0)
            and self.log_ratio == (0.0, 0.0)
            and self.flip_p == 0.0
            and (self.jitter_p == 0.0 or self.brightness == self.contrast == self.saturation == self.hue == 0.0)
            and self.grayscale_p == 0.0
            and self.blur_p == 0.0
            and self.solarize_p == 0.0
        )


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, C, H, W) of dtype uint8, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype torch.uint8 (values 0..255), got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (dim 1), got shape {tuple(images.shape)}")


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a real number in [0, {MAX_STRENGTH}], got {strength!r}")
    value = float(strength)
    if not 0.0 <= value <= MAX_STRENGTH:  # also rejects NaN
        raise ValueError(f"strength must be in [0, {MAX_STRENGTH}], got {strength!r}")
    return value


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")


def _stats_tensor(
    values: float | Sequence[float] | None, channels: int, name: str, device: torch.device
) -> torch.Tensor:
    """Per-channel statistic as a float32 ``(1, C, 1, 1)`` tensor; None means 0.5."""
    if values is None:
        seq: tuple[float, ...] = (0.5,) * channels
    elif isinstance(values, numbers.Real):
        seq = (float(values),) * channels
    else:
        seq = tuple(float(v) for v in values)
        if len(seq) == 1:
            seq = seq * channels
    if len(seq) != channels:
        raise ValueError(f"{name} must have 1 or {channels} entries (one per channel), got {len(seq)}")
    if name == "std" and min(seq) <= 0:
        raise ValueError(f"std must be positive, got {list(seq)}")
    return _constant(seq, device).view(1, channels, 1, 1)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...] | tuple[tuple[float, ...], ...], device: torch.device) -> torch.Tensor:
    """A small float32 constant on ``device``, made once: a host-to-device copy per batch would
    stall the CUDA stream for nothing."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _pair(size: int | tuple[int, int] | None, default: tuple[int, int], name: str) -> tuple[int, int]:
    if size is None:
        return default
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {size!r}")
    return (int(pair[0]), int(pair[1]))


# ----------------------------------------------------------------------------------------------
# Recipes: strength -> parameters


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side, at least 3 (SimCLR's rule; 3 at 28 px)."""
    return max(3, int(0.1 * image_size) | 1)


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; expected one of {', '.join(PRESETS)}")


def _simclr_view(s: float, channels: int, image_size: int, preset: str = "seed", min_area: float = 0.08) -> ViewRecipe:
    _check_preset(preset)
    paper = preset == "paper"
    # At s = 1 the crop area starts at the paper's min_area (seed: 0.8); s = 0 always keeps the image.
    low = max(0.08, 1.0 - (1.0 - min_area) * s) if paper else max(0.08, 1.0 - 0.2 * s)
    blur = min(1.0, 0.5 * s) if not paper or image_size >= BLUR_MIN_SIZE else 0.0
    return ViewRecipe(
        scale=(low, 1.0),
        log_ratio=(s * math.log(3 / 4), s * math.log(4 / 3)),
        flip_p=min(1.0, 0.5 * s),
        jitter_p=min(1.0, 0.8 * s),
        brightness=0.4 * s,
        contrast=0.4 * s,
        saturation=0.4 * s if channels == 3 else 0.0,
        hue=min(0.5, 0.1 * s) if channels == 3 else 0.0,
        grayscale_p=min(1.0, 0.2 * s) if channels == 3 else 0.0,
        blur_p=blur,
        blur_sigma=(0.1, 0.1 + 1.9 * s),
        blur_kernel=blur_kernel_size(image_size),
    )


def view_recipes(
    recipe: str, strength: float, *, channels: int = 1, image_size: int = 28, preset: str = "seed"
) -> tuple[ViewRecipe, ViewRecipe]:
    """The two (global) views' recipes at ``strength`` for ``recipe`` in :data:`RECIPES`.

    ``simclr``/``multicrop``: both views are the SimCLR recipe scaled by strength.
    ``byol``: the same, except view 1 always blurs (p = min(1, s)) and view 2 blurs with
    p = min(1, 0.1 s) and solarizes with p = min(1, 0.2 s), as in BYOL.
    ``preset`` (:data:`PRESETS`): ``seed`` is the seed notebook's recipe at every size; ``paper``
    the papers' by resolution: crop area from 0.08 at s = 1 (multi-crop globals: DINO's 0.4), and
    no blur below :data:`BLUR_MIN_SIZE` px (BYOL's blur probabilities included).
    """
    _check_recipe(recipe)
    s = _check_strength(strength)
    base = _simclr_view(s, channels, image_size, preset, 0.4 if recipe == "multicrop" else 0.08)
    if recipe != "byol":
        return base, base
    blurs = preset == "seed" or image_size >= BLUR_MIN_SIZE
    first = _replace(base, blur_p=min(1.0, 1.0 * s) if blurs else 0.0)
    second = _replace(base, blur_p=min(1.0, 0.1 * s) if blurs else 0.0, solarize_p=min(1.0, 0.2 * s))
    return first, second


def local_recipe(strength: float, *, channels: int = 1, image_size: int = 28, preset: str = "seed") -> ViewRecipe:
    """Multi-crop's small crops: area in ``(0.05**s, 0.4**s)`` (DINO's (0.05, 0.4) at s = 1),
    otherwise the SimCLR photometric recipe of ``preset`` at the crops' own size."""
    s = _check_strength(strength)
    return _replace(_simclr_view(s, channels, image_size, preset), scale=(0.05**s, 0.4**s))


def _replace(recipe: ViewRecipe, **changes: object) -> ViewRecipe:
    fields = asdict(recipe)
    fields.update(changes)
    return ViewRecipe(**fields)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Elementary batched operations (public so that tests and users can apply one of them alone)


def normalize(
    images: torch.Tensor, mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, H, W)`` equal to ``(x / 255 - mean) / std``.

    ``mean``/``std`` are per channel in [0, 1] units (one value or one per channel; None = 0.5).
    The identity view used for evaluation.
    """
    _check_images(images)
    channels = images.shape[1]
    m = _stats_tensor(mean, channels, "mean", images.device)
    sd = _stats_tensor(std, channels, "std", images.device)
    # One fused multiply-add: x * (1 / (255 std)) - mean / std.
    return torch.addcmul(-m / sd, images.to(torch.float32), 1.0 / (255.0 * sd))


def crop_grid(
    scale_x: torch.Tensor, scale_y: torch.Tensor, center_x: torch.Tensor, center_y: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Sampling grid ``(N, H', W', 2)`` of axis-aligned affine maps, as ``F.affine_grid`` builds for
    ``theta = [[scale_x, 0, center_x], [0, scale_y, center_y]]`` with ``align_corners=False``.

    Built by broadcasting instead of ``F.affine_grid``'s batched matmul, which is ~20x slower on the
    CPU for small images and gains nothing without rotation. All arguments are ``(N,)`` in
    normalized coordinates; a negative ``scale_x`` flips horizontally.
    """
    h, w = out_size
    gx = _crop_axis(scale_x, center_x, w)
    gy = _crop_axis(scale_y, center_y, h)
    n = scale_x.shape[0]
    return torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)


def _crop_axis(scale: torch.Tensor, center: torch.Tensor, size: int, offset: int = 0) -> torch.Tensor:
    """Normalized source coordinates ``(N, size)`` of one axis of the crop: the centres of ``size``
    output pixels (``align_corners=False``) mapped by ``center + scale * t``. The crop's geometry,
    shared by :func:`crop_grid` and :func:`_crop_separable`.

    ``offset``: the coordinates of output pixel ``reflect(i + offset)`` instead of ``i``, the pixel
    that tap ``offset`` of a blur with reflect padding reads at output pixel ``i`` (computed in
    float from a ramp: no index gathers, which inductor would not vectorize)."""
    index = torch.arange(size, device=scale.device, dtype=scale.dtype)
    if offset:
        index = (index + offset).abs()
        index = torch.where(index > size - 1, 2 * (size - 1) - index, index)
    base = (index * 2 + 1) / size - 1
    return torch.addcmul(center[:, None], scale[:, None], base[None, :])


def _source_pixels(
    scale: torch.Tensor, center: torch.Tensor, size: int, source: int, offset: int = 0
) -> torch.Tensor:
    """Pixel coordinates ``(N, size)`` in a source axis of ``source`` pixels that ``grid_sample``
    (``align_corners=False``, ``padding_mode="border"``) samples for :func:`_crop_axis`: unnormalized,
    then clamped to the first and last pixel centres (the border mode). Written as ATen's CPU
    kernel writes it, ``(g + 1) * (source / 2) - 0.5``, so that both round alike; ``offset`` as in
    :func:`_crop_axis`."""
    return ((_crop_axis(scale, center, size, offset) + 1) * (source / 2) - 0.5).clamp(0, source - 1)


def _gaussian_taps(sigma: torch.Tensor, half: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalized Gaussian taps ``(N, 2 half + 1)`` for per-sample ``sigma`` ``(N,)``, torchvision's
    ``exp(-t^2 / (2 sigma^2))``; ``sigma <= 0`` (not drawn) gives the delta kernel."""
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=dtype)
    safe = sigma.clamp_min(1e-6)[:, None]
    weights = torch.exp(-(taps[None, :] ** 2) / (2 * safe * safe))
    delta = (taps == 0).to(dtype)[None, :].expand_as(weights)
    weights = torch.where(sigma[:, None] > 0, weights, delta)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of float ``(N, C, H, W)`` with per-sample ``sigma`` ``(N,)``.

    Reflect padding and kernel ``exp(-t^2 / (2 sigma^2))`` normalized, as torchvision's
    ``GaussianBlur``; ``sigma <= 0`` gives a delta kernel (the identity). ``kernel_size`` must be odd.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    # Reflect padding needs the image to be larger than the half-kernel: shrink the kernel if not.
    half = min(kernel_size // 2, x.shape[-1] - 1, x.shape[-2] - 1)
    if half <= 0:
        return x
    kernel_size = 2 * half + 1
    # sigma <= 0 means "not drawn": a delta kernel keeps the pixel exactly.
    weights = _gaussian_taps(sigma, half, x.dtype)
    height, width = x.shape[-2:]
    # Pad both dims once (what torchvision's 2-D conv sees), then filter rows and columns.
    padded = F.pad(x, (half, half, half, half), mode="reflect")
    w_cols = weights.view(-1, 1, 1, 1, kernel_size)
    rows = padded[..., 0:width] * w_cols[..., 0]
    for t in range(1, kernel_size):
        rows.addcmul_(padded[..., t : t + width], w_cols[..., t])
    out = rows[..., 0:height, :] * w_cols[..., 0]
    for t in range(1, kernel_size):
        out.addcmul_(rows[..., t : t + height, :], w_cols[..., t])
    return out


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(factor * x, 0, 1)`` for float ``(N, C, H, W)`` in [0, 1], per-sample ``factor`` ``(N,)``."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)`` of float ``(N, C, H, W)`` (the image itself when C = 1)."""
    if x.shape[1] == 1:
        return x
    return _luma(*x.unbind(dim=1)).unsqueeze(1)


def _luma(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean luma of each image, torchvision's ``adjust_contrast``, per-sample ``factor``."""
    f = factor.view(-1, 1, 1, 1)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.addcmul(mean * (1 - f), x, f).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each RGB image with its grayscale version, per-sample ``factor`` (identity when C = 1)."""
    if x.shape[1] == 1:
        return x
    f = factor.view(-1, 1, 1, 1)
    return torch.addcmul(rgb_to_grayscale(x) * (1 - f), x, f).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB float ``(N, 3, H, W)`` in [0, 1] by ``shift`` ``(N,)`` turns
    (torchvision's ``adjust_hue`` per sample; identity when C = 1, as PIL)."""
    if x.shape[1] == 1:
        return x
    maxc, chroma, hue6 = _rotated_hue(*x.unbind(dim=1), shift.view(-1, 1, 1))
    offsets = torch.tensor(_HUE_OFFSETS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return _hsv_channel(maxc.unsqueeze(1), chroma.unsqueeze(1), offsets + hue6.unsqueeze(1))


# HSV -> RGB without branches: channel n uses k = (n + h6) mod 6 with n = 5, 3, 1 for R, G, B.
_HUE_OFFSETS = (5.0, 3.0, 1.0)


def _rotated_hue(
    r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(value, chroma, hue)`` of RGB channels, the hue in sixths of a turn, in [-1, 5) before it
    is rotated by ``shift`` turns (broadcast against the channels); a gray pixel (chroma 0) has
    max == r and hue 0."""
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    hue6 = torch.where(
        maxc == r, (g - b) * inv, torch.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv)
    )
    return maxc, chroma, hue6 + 6.0 * shift


def _hsv_channel(maxc: torch.Tensor, chroma: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The RGB channel(s) ``value - chroma * clamp(min(k, 4 - k), 0, 1)`` at ``k = (n + h6) mod 6``
    (``k`` given as ``n + h6``; mod via floor: torch.remainder is slow on CPUs)."""
    k = k - 6.0 * torch.floor(k * (1.0 / 6.0))
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc, chroma, ramp, value=-1.0).clamp_(0.0, 1.0)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Invert the pixels ``>= threshold`` (a number or per sample ``(N,)``) of float ``(N, C, H, W)``
    in [0, 1], for the samples where ``apply`` ``(N,)`` is true."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.view(-1, 1, 1, 1)
    hit = apply.view(-1, 1, 1, 1) & (x >= threshold)
    return torch.where(hit, 1.0 - x, x)


# ----------------------------------------------------------------------------------------------
# The pipeline

# Columns of the one uniform draw per sample; fixed, so that changing one probability never
# changes the other draws (and tests can switch one operation on with everything else equal).
_COL_AREA = 0
_COL_RATIO = _COL_AREA + _CROP_ATTEMPTS
_COL_CX = _COL_RATIO + _CROP_ATTEMPTS
_COL_CY = _COL_CX + 1
_COL_FLIP = _COL_CY + 1
_COL_BLUR = _COL_FLIP + 1
_COL_SIGMA = _COL_BLUR + 1
_COL_JITTER = _COL_SIGMA + 1
_COL_BRIGHT = _COL_JITTER + 1
_COL_CONTRAST = _COL_BRIGHT + 1
_COL_SAT = _COL_CONTRAST + 1
_COL_HUE = _COL_SAT + 1
_COL_GRAY = _COL_HUE + 1
_COL_SOLAR = _COL_GRAY + 1
_N_COLS = _COL_SOLAR + 1

# Per-view numbers of a ViewRecipe, in this order, gathered into one (V, P) tensor.
_PARAM_NAMES = (
    "scale_lo", "scale_hi", "ratio_lo", "ratio_hi", "flip_p", "jitter_p", "brightness", "contrast",
    "saturation", "hue", "grayscale_p", "blur_p", "sigma_lo", "sigma_hi", "solarize_p", "solarize_threshold",
)


def _recipe_row(r: ViewRecipe) -> list[float]:
    return [
        r.scale[0], r.scale[1], r.log_ratio[0], r.log_ratio[1], r.flip_p, r.jitter_p, r.brightness,
        r.contrast, r.saturation, r.hue, r.grayscale_p, r.blur_p, r.blur_sigma[0], r.blur_sigma[1],
        r.solarize_p, r.solarize_threshold,
    ]


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(n, _N_COLS)`` uniforms drawn with ``generator`` on the generator's own device."""
    if generator is None:
        return torch.rand(n, _N_COLS, device=device)
    u = torch.rand(n, _N_COLS, generator=generator, device=generator.device)
    return u.to(device, non_blocking=True)


def augment(
    images: torch.Tensor,
    recipes: Sequence[ViewRecipe],
    *,
    out_size: int | tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    compiled: bool | None = None,
) -> list[torch.Tensor]:
    """One augmented view per recipe of uint8 ``images`` ``(B, C, H, W)``.

    All views are made together as one ``(len(recipes) * B, C, H', W')`` batch (``H', W'`` =
    ``out_size``, default the input size) and returned as a list of float32 ``(B, C, H', W')``
    tensors on the images' device, normalized with ``mean``/``std`` (per channel, [0, 1] units,
    default 0.5). Deterministic for a given ``generator`` state.

    ``compiled``: run the per-pixel stage through ``torch.compile`` (a few fused kernels instead of
    ~130 passes over the batch; the same results up to float rounding), falling back to eager
    operations when it cannot compile. ``None`` takes the process-wide default of
    :func:`use_compiled_augmentation` (off).
    """
    _check_images(images)
    if len(recipes) == 0:
        raise ValueError("recipes must hold at least one ViewRecipe")
    if not all(isinstance(r, ViewRecipe) for r in recipes):
        raise TypeError("recipes must be ViewRecipe instances")
    batch, channels, height, width = images.shape
    out_h, out_w = _pair(out_size, (height, width), "out_size")
    device = images.device
    m = _stats_tensor(mean, channels, "mean", device)
    sd = _stats_tensor(std, channels, "std", device)

    if all(r.is_identity for r in recipes) and (out_h, out_w) == (height, width):
        # Identity views (strength 0): skip the pipeline, and the random draws with it.
        return [normalize(images, mean, std) for _ in recipes]

    n_views = len(recipes)
    n = n_views * batch
    u = _uniform(n, generator, device)
    params = _constant(tuple(tuple(_recipe_row(r)) for r in recipes), device)
    p = dict(zip(_PARAM_NAMES, params.repeat_interleave(batch, dim=0).unbind(dim=1)))

    # 1. Random resized crop + flip. Up to _CROP_ATTEMPTS (area, ratio) pairs per sample, the first
    # that fits is kept, else the whole image (torchvision's fallback for ratios within the range).
    area = p["scale_lo"][:, None] + (p["scale_hi"] - p["scale_lo"])[:, None] * u[:, _COL_AREA:_COL_RATIO]
    log_ratio = p["ratio_lo"][:, None] + (p["ratio_hi"] - p["ratio_lo"])[:, None] * u[:, _COL_RATIO:_COL_CX]
    ratio = torch.exp(log_ratio)
    aspect = height / width
    crop_w = torch.sqrt(area * ratio * aspect)  # fractions of the image width / height
    crop_h = torch.sqrt(area / ratio / aspect)
    fits = (crop_w <= 1.0) & (crop_h <= 1.0)
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    crop_w = torch.where(any_fit, crop_w.gather(1, first).squeeze(1), torch.ones_like(any_fit, dtype=torch.float32))
    crop_h = torch.where(any_fit, crop_h.gather(1, first).squeeze(1), torch.ones_like(crop_w))
    center_x = (1.0 - crop_w) * (2.0 * u[:, _COL_CX] - 1.0)
    center_y = (1.0 - crop_h) * (2.0 * u[:, _COL_CY] - 1.0)
    scale_x = torch.where(u[:, _COL_FLIP] < p["flip_p"], -crop_w, crop_w)

    # 2. Gaussian blur: sigma 0 (delta kernel) where not drawn. Views of one call share a size,
    # hence a kernel; a custom recipe mix gets the largest one.
    kernels = {r.blur_kernel for r in recipes if r.blur_p > 0}
    sigma = p["sigma_lo"] + (p["sigma_hi"] - p["sigma_lo"]) * u[:, _COL_SIGMA]
    sigma = torch.where(u[:, _COL_BLUR] < p["blur_p"], sigma, torch.zeros_like(sigma))

    # 3. Colour jitter: identity factors where not drawn.
    jitter = u[:, _COL_JITTER] < p["jitter_p"]

    def factor(magnitude: torch.Tensor, column: int) -> torch.Tensor:
        low = (1.0 - magnitude).clamp_min(0.0)
        drawn = low + (1.0 + magnitude - low) * u[:, column]
        return torch.where(jitter, drawn, torch.ones_like(drawn))

    shift = p["hue"] * (2.0 * u[:, _COL_HUE] - 1.0)
    colour = channels == 3
    plan = _Plan(
        n_views=n_views,
        out_size=(out_h, out_w),
        blur_kernel=max(kernels) if kernels else 0,
        brightness=any(r.jitter_p > 0 and r.brightness > 0 for r in recipes),
        contrast=any(r.jitter_p > 0 and r.contrast > 0 for r in recipes),
        saturation=colour and any(r.jitter_p > 0 and r.saturation > 0 for r in recipes),
        hue=colour and any(r.jitter_p > 0 and r.hue > 0 for r in recipes),
        grayscale=colour and any(r.grayscale_p > 0 for r in recipes),
        solarize=any(r.solarize_p > 0 for r in recipes),
    )
    draws = _Draws(
        crop=torch.stack((scale_x, crop_h, center_x, center_y)),
        sigma=sigma,
        jitter=jitter,
        brightness=factor(p["brightness"], _COL_BRIGHT),
        contrast=factor(p["contrast"], _COL_CONTRAST),
        saturation=factor(p["saturation"], _COL_SAT),
        hue=torch.where(jitter, shift, torch.zeros_like(shift)),
        grayscale=u[:, _COL_GRAY] < p["grayscale_p"],
        solarize=u[:, _COL_SOLAR] < p["solarize_p"],
        threshold=p["solarize_threshold"],
        scale=1.0 / sd,
        shift=-m / sd,
    )
    use_compiled = _COMPILED["enabled"] if compiled is None else compiled
    x = _compiled_pixels(plan, images, draws) if use_compiled else None
    if x is None:
        x = _pixels(plan, images, draws, subsets=device.type == "cpu")
    return list(x.split(batch, dim=0))


# ----------------------------------------------------------------------------------------------
# The per-pixel stage: one function for the eager and the compiled path


@dataclass(frozen=True)
class _Plan:
    """Which operations a call applies (static: a compiled pixel stage is specialized on it)."""

    n_views: int
    out_size: tuple[int, int]
    blur_kernel: int  # 0: no blur
    brightness: bool
    contrast: bool
    saturation: bool
    hue: bool
    grayscale: bool
    solarize: bool


@dataclass(frozen=True)
class _Draws:
    """Per-sample parameters ``(N,)`` already drawn (and the normalization ``(1, C, 1, 1)``)."""

    crop: torch.Tensor
    """``(4, N)``: the crop grid's scale x (negative: flipped), scale y, centre x, centre y."""
    sigma: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor
    solarize: torch.Tensor
    threshold: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def rows(self, index: slice) -> _Draws:
        """The draws of the batch rows ``index`` (the normalization is shared)."""
        return _Draws(**{
            name: value if name in ("scale", "shift") else value[..., index]
            for name, value in ((f, getattr(self, f)) for f in self.__dataclass_fields__)
        })


def _on_subset(
    x: torch.Tensor, selected: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``op(x[i], i)`` for the samples ``i`` where ``selected`` is true; the others as they are.

    Only for operations that are the identity (up to float rounding) on the unselected samples:
    on the CPU it skips their work (no device sync to fear); ``op`` gets the selected rows and their
    indices, to pick their parameters."""
    index = selected.nonzero().squeeze(1)
    if index.numel() == x.shape[0]:
        return op(x, index)
    if index.numel() > 0:
        x.index_copy_(0, index, op(x.index_select(0, index), index))
    return x


def _pixels(plan: _Plan, images: torch.Tensor, d: _Draws, *, subsets: bool = False) -> torch.Tensor:
    """The augmented, normalized ``(V*B, C, H', W')`` float batch of uint8 ``images`` for ``plan``:
    :func:`_crop`, then :func:`_photometric`."""
    return _photometric(plan, _crop(plan, images, d), d, subsets=subsets)


def _crop(plan: _Plan, images: torch.Tensor, d: _Draws) -> torch.Tensor:
    """Step 1, crop + flip: float ``(V*B, C, H', W')`` in [0, 255]. Sampling stays inside the
    image (the crop's width and height are at most the image's, its centre at most
    ``1 - size`` off centre), so the border padding mode only matters for rounding at the edges.
    The eager stage's crop, one ATen kernel; the compiled stage computes the same samples with
    :func:`_crop_separable` (inductor decomposes ``grid_sample`` into scalar gathers, slower on
    the CPU than this kernel; docs/PERFORMANCE.md)."""
    source = images.to(torch.float32)
    if plan.n_views > 1:
        source = source.repeat(plan.n_views, 1, 1, 1)
    grid = crop_grid(*d.crop.unbind(0), plan.out_size)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_separable(plan: _Plan, images: torch.Tensor, d: _Draws) -> torch.Tensor:
    """:func:`_crop`'s output, then the blur of :func:`gaussian_blur` when ``plan`` has one (the
    same values up to float rounding), computed per axis for the compiled stage:
    :func:`_crop_apply` of :func:`_crop_weights`.

    Bilinear interpolation of an axis-aligned crop is a linear map per axis, and so is the
    separable blur that follows it: each output pixel is a weighted sum of a few source pixels along
    each axis, so the two are applied together, once per axis. Inductor fuses the gathers and the
    blend into a few loops; ATen's ``grid_sample`` inside a compiled graph is decomposed into
    scalar gathers, and a blur after the crop is a second pass that inductor inlines tap by tap
    (both slower: docs/PERFORMANCE.md). ``grid_sample``'s border mode is the clamp of the
    coordinates in :func:`_source_pixels`, the blur's reflect padding their ``offset``. On CUDA
    with TF32 matrix products allowed (the training loop allows them), the column product rounds
    its inputs to TF32's 10-bit mantissa: about 0.1-0.25 grey levels, not float32 rounding (not
    measured here: no GPU)."""
    height, width = images.shape[2:]
    return _crop_apply(images, _crop_weights(_crop_bands(plan, d.crop, d.sigma, height, width), width))


@dataclass(frozen=True)
class _CropWeights:
    """The crop-and-blur's per-axis weights of ``N`` batch rows (:func:`_crop_weights`)."""

    rows: torch.Tensor
    """``(N, H', K)``: each output row's weights over its band of ``K`` source rows."""
    row_index: torch.Tensor
    """``(N, H', K)`` int64: those source rows."""
    columns: torch.Tensor
    """``(N, W, W')``: each output column's weights over the source columns."""

    def select(self, index: slice) -> _CropWeights:
        return _CropWeights(self.rows[index], self.row_index[index], self.columns[index])


def _crop_weights(
    bands: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], width: int
) -> _CropWeights:
    """The weights that :func:`_crop_apply` applies, from the :func:`_crop_bands` of sources
    ``width`` pixels wide: the columns' band spread into a dense matrix for the batched product
    (the rows' are applied by gathering whole source rows). They depend on the draws only, so the
    compiled stage computes them once per call, not per piece of pixels."""
    rows, row_index, column_weights, column_index = bands
    return _CropWeights(rows, row_index, _band_matrix(column_weights, column_index, width))


def _crop_bands(
    plan: _Plan, crop: torch.Tensor, sigma: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_axis_band` of the rows, then of the columns: ``(row weights, row index, column
    weights, column index)``, each ``(N, H', K)`` or ``(N, W', K)``."""
    scale_x, scale_y, center_x, center_y = crop.unbind(0)
    out_h, out_w = plan.out_size
    # gaussian_blur's kernel, shrunk as it shrinks it for small outputs (reflect needs half < size).
    half = min(plan.blur_kernel // 2, out_h - 1, out_w - 1) if plan.blur_kernel else 0
    taps = _gaussian_taps(sigma, half, torch.float32)
    return (*_axis_band(scale_y, center_y, out_h, height, taps), *_axis_band(scale_x, center_x, out_w, width, taps))


def _band_matrix(weights: torch.Tensor, index: torch.Tensor, source: int) -> torch.Tensor:
    """The dense ``(N, source, size)`` matrix of the bands ``weights``/``index`` ``(N, size, K)``:
    output pixel ``x`` takes ``weights[x, k]`` at source pixel ``index[x, k]``. A scatter, eager
    also in the compiled stage: compiled, inductor recomputed every band weight once per matrix
    entry. Each entry gets one nonzero term at most (a band's clamped tail repeats the last pixel
    with weight 0), so the sum's order, which CUDA's atomic adds do not fix, cannot change it."""
    n, size, _ = weights.shape
    matrix = torch.zeros((n, source, size), dtype=weights.dtype, device=weights.device)
    return matrix.scatter_add_(1, index.transpose(1, 2), weights.transpose(1, 2))


def _crop_apply(images: torch.Tensor, weights: _CropWeights) -> torch.Tensor:
    """The float ``(N, C, H', W')`` crop (and blur) of uint8 ``images`` ``(B, C, H, W)``, batch row
    ``n`` from source sample ``n % B`` (view ``v`` of sample ``b`` is row ``v B + b``). Each output
    row is the weighted sum of its band of source rows, gathered whole (vectorized along them)
    straight from the uint8 images: no float copy of the source, no ``repeat`` per view; then one
    batched matrix product ``(N, C H', W) @ (N, W, W')`` applies the columns' weights."""
    batch, channels, height, width = images.shape
    n, out_h, _ = weights.rows.shape
    out_w = weights.columns.shape[2]
    device = images.device
    plane = (torch.arange(n, device=device) % batch)[:, None] * channels + torch.arange(channels, device=device)
    first = (plane * height)[:, :, None]  # (N, C, 1): the flat index of each plane's row 0
    flat = images.reshape(batch * channels * height, width)
    rows = None
    for k in range(weights.row_index.shape[2]):
        term = flat[first + weights.row_index[:, None, :, k]].to(torch.float32) * weights.rows[:, None, :, k, None]
        rows = term if rows is None else rows + term
    assert rows is not None
    return torch.bmm(rows.reshape(n, channels * out_h, width), weights.columns).view(n, channels, out_h, out_w)


def _axis_band(
    scale: torch.Tensor, center: torch.Tensor, size: int, source: int, taps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The source pixels of one axis that each output pixel of the crop, blurred with ``taps``
    ``(N, T)``, is a weighted sum of: ``(weights, index)``, both ``(N, size, K)``, ``index`` the
    band of ``K`` consecutive source pixels from the lowest one any tap reads (clamped to the last
    pixel, where its weight is 0). The band is static (a compiled stage is specialized on it): the
    ``T`` taps' coordinates are ``T - 1`` output pixels apart at most, ``source / size`` source
    pixels each for a crop at most the image's size, and each tap's tent reads two neighbours."""
    half = taps.shape[1] // 2
    coordinates = [_source_pixels(scale, center, size, source, tap) for tap in range(-half, half + 1)]
    start = torch.stack(coordinates).amin(dim=0).floor()
    width = min(source, math.ceil(2 * half * source / size) + 2)
    pixels = start[:, :, None] + torch.arange(width, device=scale.device, dtype=torch.float32)
    weights = None
    for tap, coordinate in enumerate(coordinates):
        term = taps[:, tap, None, None] * (1 - (coordinate[:, :, None] - pixels).abs()).clamp_min(0)
        weights = term if weights is None else weights + term
    assert weights is not None
    return weights, pixels.long().clamp_max(source - 1)


def _photometric(plan: _Plan, x: torch.Tensor, d: _Draws, *, subsets: bool = False) -> torch.Tensor:
    """Steps 2-6 on the cropped batch ``x`` in [0, 255] (consumed).

    ``subsets``: apply the blur, jitter and grayscale only to the samples that drew them (CPU only:
    selecting rows needs the draws on the host); the others' values are the same up to rounding.
    """
    # In place when eager (the cropped batch is ours); a traced in-place update of an input would
    # be copied back to it, one more pass.
    x = x * (1.0 / 255.0) if torch.compiler.is_compiling() else x.mul_(1.0 / 255.0)

    # 2. Blur (a delta kernel, exactly the identity, where not drawn).
    if plan.blur_kernel:
        x = _on_subset(x, d.sigma > 0, lambda v, i: gaussian_blur(v, d.sigma[i], plan.blur_kernel)) if subsets \
            else gaussian_blur(x, d.sigma, plan.blur_kernel)

    # 3. Colour jitter in the fixed order brightness, contrast, saturation, hue.
    if plan.brightness or plan.contrast or plan.saturation or plan.hue:

        def jitter(v: torch.Tensor, i: torch.Tensor | None) -> torch.Tensor:
            def pick(t: torch.Tensor) -> torch.Tensor:
                return t if i is None else t[i]

            if plan.brightness:
                v = adjust_brightness(v, pick(d.brightness))
            if plan.contrast:
                v = adjust_contrast(v, pick(d.contrast))
            if plan.saturation:
                v = adjust_saturation(v, pick(d.saturation))
            if plan.hue:
                v = adjust_hue(v, pick(d.hue))
            return v

        x = _on_subset(x, d.jitter, jitter) if subsets else jitter(x, None)

    # 4. Random grayscale (colour images only).
    if plan.grayscale:
        if subsets:
            x = _on_subset(x, d.grayscale, lambda v, i: rgb_to_grayscale(v).expand_as(v))
        else:
            x = torch.where(d.grayscale.view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)

    # 5. Solarization.
    if plan.solarize:
        x = solarize(x, d.solarize, d.threshold)

    # 6. Normalize: one fused multiply-add, (x - m) / sd = x * (1 / sd) - m / sd.
    return torch.addcmul(d.shift, x, d.scale)


def _photometric_rgb(plan: _Plan, x: torch.Tensor, d: _Draws) -> list[torch.Tensor]:
    """:func:`_photometric` without the blur on RGB ``x`` in [0, 255], written channel by channel
    for the compiled stage: the three normalized ``(N, H', W')`` channels. The same operations in
    the same order (equal up to float rounding), but each pixel's three channels are computed
    together, so that inductor makes one loop over the pixels after the contrast's mean and
    shares the hue rotation's maximum, chroma and hue between the channels (on whole
    ``(N, 3, H, W)`` tensors it makes a loop per channel, each recomputing them); the stage
    writes each channel into its output (a ``stack`` would be one more copy)."""
    if plan.blur_kernel:
        raise ValueError("_photometric_rgb takes a plan without blur (the crop applies it)")

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1)

    c = [channel * (1.0 / 255.0) for channel in x.unbind(dim=1)]
    if plan.brightness:
        f = per_sample(d.brightness)
        c = [(channel * f).clamp(0.0, 1.0) for channel in c]
    if plan.contrast:
        f = per_sample(d.contrast)
        mean = _luma(*c).mean(dim=(1, 2), keepdim=True)
        c = [torch.addcmul(mean * (1 - f), channel, f).clamp(0.0, 1.0) for channel in c]
    if plan.saturation:
        f = per_sample(d.saturation)
        grey = _luma(*c) * (1 - f)
        c = [torch.addcmul(grey, channel, f).clamp(0.0, 1.0) for channel in c]
    if plan.hue:
        maxc, chroma, hue6 = _rotated_hue(*c, per_sample(d.hue))
        c = [_hsv_channel(maxc, chroma, offset + hue6) for offset in _HUE_OFFSETS]
    if plan.grayscale:
        grey = _luma(*c)
        c = [torch.where(per_sample(d.grayscale), grey, channel) for channel in c]
    if plan.solarize:
        threshold = per_sample(d.threshold)
        hit = per_sample(d.solarize)
        c = [torch.where(hit & (channel >= threshold), 1.0 - channel, channel) for channel in c]
    scale, shift = d.scale.view(-1), d.shift.view(-1)
    return [torch.addcmul(shift[i], channel, scale[i]) for i, channel in enumerate(c)]


# ----------------------------------------------------------------------------------------------
# The compiled pixel stage

# Process-wide default of augment(compiled=None); see use_compiled_augmentation.
_COMPILED: dict[str, bool] = {"enabled": False}


@dataclass
class _Compiled:
    """One plan's compiled pixel stage (a piece of rows into its output) and the compiled crop
    bands it is given (:func:`_crop_bands`, once per call: inductor would otherwise inline their
    arithmetic into the pixel loops, once per pixel), the first call's seconds (tracing +
    code generation + running it), and why it fell back to eager, if it did."""

    fn: Callable[..., None]
    geometry: Callable[..., tuple[torch.Tensor, ...]]
    first_call_s: float | None = None
    failure: str | None = None


_COMPILED_PLANS: dict[_Plan, _Compiled] = {}
# Output bytes per piece of the compiled stage on the CPU: a few MiB, within the L2/L3 caches of a
# server core (the pieces' sizes were measured at 64 px: docs/PERFORMANCE.md).
_CPU_PIECE_BYTES = 6 << 20


def use_compiled_augmentation(enabled: bool = True) -> None:
    """Make ``augment`` (and ``two_views``, ``multi_crop``, ``make_views``) use the compiled pixel
    stage by default in this process (``compiled=None`` calls). Compiling costs tens of seconds
    per recipe mix and batch shape on the first call (cached on disk by inductor afterwards)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _COMPILED["enabled"] = enabled


def compiled_augmentation() -> list[dict[str, object]]:
    """The pixel stages compiled in this process: their plan (one view's: the stage runs view by
    view, see :func:`_compiled_pixels`), first call's seconds (compile included) and the failure
    that made one fall back to eager, if any."""
    return [
        {"plan": asdict(plan), "first_call_s": entry.first_call_s, "failure": entry.failure}
        for plan, entry in _COMPILED_PLANS.items()
    ]


def _compiled_pixels(plan: _Plan, images: torch.Tensor, draws: _Draws) -> torch.Tensor | None:
    """The pixel stage's output computed by compiled code (the crop's bands once, then the crop
    with the blur, the jitter and the normalization view by view), or None when that could not
    compile or run (warned once per plan: the caller then runs the eager one).

    On the CPU the stage runs on pieces of about :data:`_CPU_PIECE_BYTES` of output, each view's
    rows cut into equal pieces, written into one output batch: a piece's few passes (the colour
    jitter's per-image contrast mean splits them) then stay in the cache, where the whole batch's
    passes would each go to memory (``harness bench``'s stage profile measures it). On a GPU each
    view is one piece."""
    batch, channels = images.shape[:2]
    out_h, out_w = plan.out_size
    piece_plan = replace(plan, n_views=1)
    entry = _COMPILED_PLANS.get(piece_plan)
    if entry is None:
        linear_plan = replace(piece_plan, blur_kernel=0)

        def geometry(
            crop: torch.Tensor, sigma: torch.Tensor, height: int, width: int
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            return _crop_bands(piece_plan, crop, sigma, height, width)

        def stage(images: torch.Tensor, weights: _CropWeights, draws: _Draws, out: torch.Tensor) -> None:
            _stage_pixels(linear_plan, images, weights, draws, out)

        # Static shapes: each piece size is one specialization (at most two per batch size); a
        # dynamic-shape graph, which dynamo makes at a second size, added guards on the pieces'
        # storage offsets and so more recompilations, each counted against dynamo's limit per code
        # object (all plans share this one).
        entry = _COMPILED_PLANS[piece_plan] = _Compiled(
            torch.compile(stage, dynamic=False), torch.compile(geometry, dynamic=False)
        )
    if entry.failure is not None:
        return None
    out = torch.empty((plan.n_views * batch, channels, out_h, out_w), device=images.device)
    per_image = channels * out_h * out_w * out.element_size()
    size = batch if images.device.type != "cpu" else _piece_size(batch, per_image)
    start = time.perf_counter()
    try:
        weights = _crop_weights(entry.geometry(draws.crop, draws.sigma, *images.shape[2:]), images.shape[3])
        for view in range(plan.n_views):
            for first in range(0, batch, size):
                rows = slice(view * batch + first, view * batch + min(batch, first + size))
                entry.fn(images[first : first + size], weights.select(rows), draws.rows(rows), out[rows])
    except Exception as error:  # any compiler failure means "use the eager stage"
        entry.failure = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        warnings.warn(
            f"augmentation: the compiled pixel stage failed ({entry.failure}); "
            "using the eager operations (same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if entry.first_call_s is None:
        entry.first_call_s = time.perf_counter() - start
    return out


def _stage_pixels(
    plan: _Plan, images: torch.Tensor, weights: _CropWeights, draws: _Draws, out: torch.Tensor
) -> None:
    """The compiled stage's pixels into ``out``: :func:`_crop_apply` (the blur folded into
    ``weights``, so ``plan`` has none), then the rest of the chain, channel by channel for RGB."""
    cropped = _crop_apply(images, weights)
    if images.shape[1] == 3:
        for channel, values in enumerate(_photometric_rgb(plan, cropped, draws)):
            out[:, channel].copy_(values)
    else:
        out.copy_(_photometric(plan, cropped, draws))


def _piece_size(batch: int, per_image: int) -> int:
    """Images per piece of the compiled stage on the CPU: the fewest pieces of about
    :data:`_CPU_PIECE_BYTES` (rounded up to whole images), or up to twice as many when that makes
    them equal (each piece size is one more compiled specialization)."""
    fewest = max(1, -(-batch * per_image // _CPU_PIECE_BYTES))
    equal = next((count for count in range(fewest, 2 * fewest + 1) if batch % count == 0), fewest)
    return -(-batch // equal)


def two_views(
    images: torch.Tensor,
    strength: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    recipe: str = "simclr",
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    preset: str = "seed",
    compiled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented, normalized float32 views ``(B, C, H, W)`` of uint8 ``images`` ``(B, C, H, W)``.

    ``strength`` in [0, 2] scales the whole recipe: 0 gives two copies of the normalized original,
    1 the seed notebook's SimCLR recipe (see docs/DATA.md). ``recipe`` is ``"simclr"``,
    ``"byol"`` (asymmetric blur/solarize) or ``"multicrop"`` (its two global views).
    """
    v1, v2 = _recipe_views(images, recipe, strength, 2, generator, mean, std, preset, compiled)
    return v1, v2


def _recipe_views(
    images: torch.Tensor,
    recipe: str,
    strength: float,
    count: int,
    generator: torch.Generator | None,
    mean: float | Sequence[float] | None,
    std: float | Sequence[float] | None,
    preset: str,
    compiled: bool | None,
) -> list[torch.Tensor]:
    """The first ``count`` (1 or 2) of ``recipe``'s two (global) views, made together."""
    _check_images(images)
    recipes = view_recipes(recipe, strength, channels=images.shape[1], image_size=images.shape[2], preset=preset)
    return augment(images, recipes[:count], generator=generator, mean=mean, std=std, compiled=compiled)


def multi_crop(
    images: torch.Tensor,
    strength: float = 1.0,
    *,
    n_local: int,
    global_size: int | None = None,
    local_size: int | None = None,
    generator: torch.Generator | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    preset: str = "seed",
    compiled: bool | None = None,
) -> list[torch.Tensor]:
    """2 global views ``(B, C, G, G)`` followed by ``n_local`` local crops ``(B, C, L, L)`` (SwAV/DINO).

    ``G`` defaults to the input size, ``L`` to ``round(0.43 * H)`` (12 px for 28 px, DINO's 96/224).
    Global views use the SimCLR recipe; local crops cover ``(0.05**s, 0.4**s)`` of the image with
    the same photometric augmentations.
    """
    _check_images(images)
    s = _check_strength(strength)
    if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
        raise ValueError(f"n_local must be a non-negative int, got {n_local!r}")
    channels, height = images.shape[1], images.shape[2]
    g = _pair(global_size, (height, images.shape[3]), "global_size")
    default_local = max(1, round(0.43 * height))
    loc = _pair(local_size, (default_local, default_local), "local_size")
    globals_ = augment(
        images, view_recipes("multicrop", s, channels=channels, image_size=g[0], preset=preset),
        out_size=g, generator=generator, mean=mean, std=std, compiled=compiled,
    )
    if n_local == 0:
        return globals_
    local = local_recipe(s, channels=channels, image_size=loc[0], preset=preset)
    locals_ = augment(
        images, [local] * n_local, out_size=loc, generator=generator, mean=mean, std=std, compiled=compiled
    )
    return globals_ + locals_


def make_views(
    images: torch.Tensor,
    recipe: str,
    strength: float,
    *,
    n_local: int = 0,
    generator: torch.Generator | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    preset: str = "seed",
    compiled: bool | None = None,
    n_views: int = 2,
) -> list[torch.Tensor]:
    """The views the training loop feeds to a method: ``[v1, v2]`` for ``simclr``/``byol``, and
    ``[g1, g2, l1, ..., l_n_local]`` for ``multicrop``. All float32, normalized, on the images' device.
    ``n_views=1``: only ``[v1]`` of a two-view recipe, made alone (a method that trains on one view,
    the one-view supervised baseline, pays for one view's augmentation, not two).
    """
    _check_recipe(recipe)
    if n_views not in (1, 2):
        raise ValueError(f"n_views must be 1 or 2, got {n_views}")
    if recipe == "multicrop":
        if n_views != 2:
            raise ValueError(f"n_views={n_views}: recipe='multicrop' always makes its two global views")
        return multi_crop(
            images, strength, n_local=n_local, generator=generator, mean=mean, std=std, preset=preset, compiled=compiled
        )
    if n_local != 0:
        raise ValueError(f"n_local={n_local} needs recipe='multicrop', got recipe={recipe!r}")
    return _recipe_views(images, recipe, strength, n_views, generator, mean, std, preset, compiled)
