"""Batched augmentation: recipes, determinism, each operation, argument errors."""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data import (
    RECIPES,
    ViewRecipe,
    augment,
    load_dataset,
    local_recipe,
    make_views,
    multi_crop,
    normalize,
    two_views,
    view_recipes,
)
from harness.data.augment import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_grid,
    gaussian_blur,
    rgb_to_grayscale,
    solarize,
)

# The module itself (``harness.data.augment`` the attribute is the function of that name).
AUG = importlib.import_module("harness.data.augment")


def images(channels: int = 1, n: int = 16, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Class-structured uint8 (n, C, size, size) images (a small synthetic dataset, cached in-process)."""
    return load_dataset(
        "synthetic", "test", size=n, seed=seed, channels=channels, image_size=size, num_train=200, num_test=512
    ).images


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-sample anisotropic total variation of (N, C, H, W)."""
    return (x.diff(dim=-1).abs().sum((1, 2, 3)) + x.diff(dim=-2).abs().sum((1, 2, 3)))


def unit(x: torch.Tensor) -> torch.Tensor:
    """Views normalized with the default mean = std = 0.5 back to [0, 1]."""
    return x * 0.5 + 0.5


# ----------------------------------------------------------------------------------------------
# two_views


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("recipe", ["simclr", "byol", "multicrop"])
def test_two_views__shapes_and_dtype(channels: int, recipe: str) -> None:
    x = images(channels)
    v1, v2 = two_views(x, 1.0, generator=gen(), recipe=recipe)
    assert v1.shape == v2.shape == x.shape
    assert v1.dtype == v2.dtype == torch.float32 and v1.device == x.device


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views__deterministic_with_generator(channels: int) -> None:
    x = images(channels)
    a = two_views(x, 1.0, generator=gen(5))
    b = two_views(x, 1.0, generator=gen(5))
    c = two_views(x, 1.0, generator=gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_views__strength_zero_is_normalized_original(channels: int, recipe: str) -> None:
    x = images(channels)
    v1, v2 = two_views(x, 0.0, generator=gen(), recipe=recipe, mean=0.3, std=0.2)
    expected = normalize(x, 0.3, 0.2)
    assert torch.equal(v1, expected) and torch.equal(v2, expected)


def test_two_views__views_differ_at_strength_one() -> None:
    v1, v2 = two_views(images(), 1.0, generator=gen())
    assert (v1 - v2).abs().flatten(1).amax(1).min() > 0.1


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views__values_in_normalized_range(channels: int) -> None:
    ds = load_dataset("synthetic", "test", size=64, channels=channels, num_train=200, num_test=512)
    for strength in (0.5, 1.0, 2.0):
        for view in two_views(ds.images, strength, generator=gen(), mean=ds.mean, std=ds.std):
            low = torch.tensor([(0 - m) / s for m, s in zip(ds.mean, ds.std)]).view(1, -1, 1, 1)
            high = torch.tensor([(1 - m) / s for m, s in zip(ds.mean, ds.std)]).view(1, -1, 1, 1)
            assert torch.all(view >= low - 1e-5) and torch.all(view <= high + 1e-5)
            assert torch.isfinite(view).all()


def test_two_views__default_stats_map_to_unit_range() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 4, 4).contiguous()
    out = normalize(x)
    assert torch.allclose(out[0], torch.tensor(-1.0)) and torch.allclose(out[1], torch.tensor(1.0))
    assert torch.allclose(normalize(x, 0.2, 0.4), (x.float() / 255 - 0.2) / 0.4, atol=1e-6)


@given(strength=st.floats(0.0, 2.0), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**31))
@settings(max_examples=10, deadline=None)
def test_two_views__any_strength_gives_finite_bounded_views(strength: float, channels: int, seed: int) -> None:
    x = images(channels, n=4)
    for view in two_views(x, strength, generator=gen(seed)):
        assert view.shape == x.shape and torch.isfinite(view).all()
        assert view.min() >= -1 - 1e-5 and view.max() <= 1 + 1e-5


def test_two_views__default_generator_draws_fresh_views() -> None:
    x = images()
    torch.manual_seed(0)
    a = two_views(x)
    torch.manual_seed(0)
    b = two_views(x)
    c = two_views(x)
    assert torch.equal(a[0], b[0]) and not torch.equal(b[0], c[0])


# ----------------------------------------------------------------------------------------------
# Strength -> recipe


def test_view_recipes__strength_one_is_the_seed_recipe() -> None:
    v1, v2 = view_recipes("simclr", 1.0, channels=1, image_size=28)
    assert v1 == v2
    assert v1.scale == pytest.approx((0.8, 1.0)) and v1.blur_kernel == 3
    assert v1.log_ratio == pytest.approx((math.log(3 / 4), math.log(4 / 3)))
    assert (v1.flip_p, v1.jitter_p, v1.blur_p) == pytest.approx((0.5, 0.8, 0.5))
    assert (v1.brightness, v1.contrast) == pytest.approx((0.4, 0.4))
    assert v1.blur_sigma == pytest.approx((0.1, 2.0)) and v1.grayscale_p == 0.0
    colour = view_recipes("simclr", 1.0, channels=3, image_size=32)[0]
    assert (colour.saturation, colour.hue, colour.grayscale_p) == pytest.approx((0.4, 0.1, 0.2))


def test_view_recipes__strength_zero_is_identity_and_two_saturates() -> None:
    assert all(r.is_identity for r in view_recipes("byol", 0.0, channels=3))
    strong = view_recipes("simclr", 2.0, channels=3)[0]
    assert strong.scale[0] == pytest.approx(0.6) and strong.jitter_p == 1.0 and strong.blur_p == 1.0
    assert strong.brightness == pytest.approx(0.8) and strong.hue == pytest.approx(0.2)


def test_view_recipes__byol_is_asymmetric() -> None:
    v1, v2 = view_recipes("byol", 1.0)
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == pytest.approx((0.1, 0.2))


def test_two_views__byol_first_view_blurrier() -> None:
    x = images(n=256)
    v1, v2 = two_views(x, 1.0, generator=gen(), recipe="byol")
    s1, s2 = two_views(x, 1.0, generator=gen(), recipe="simclr")
    # View 1 always blurs: lower total variation than the sometimes-blurred SimCLR view.
    assert total_variation(v1).mean() < total_variation(s1).mean()
    # Only view 2 solarizes: some of its samples have bright pixels turned dark.
    assert not torch.equal(v2, s2)


def test_local_recipe__scale_range() -> None:
    assert local_recipe(1.0).scale == pytest.approx((0.05, 0.4))
    assert local_recipe(0.0).scale == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Each operation, forced


def test_crop_grid__matches_affine_grid() -> None:
    sx = torch.tensor([0.5, -0.9, 1.0])
    sy = torch.tensor([0.7, 0.8, 1.0])
    cx = torch.tensor([0.1, -0.05, 0.0])
    cy = torch.tensor([-0.2, 0.1, 0.0])
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, cx, cy
    expected = F.affine_grid(theta, [3, 1, 12, 20], align_corners=False)
    assert torch.allclose(crop_grid(sx, sy, cx, cy, (12, 20)), expected, atol=1e-6)


def _crop_draws(n: int, seed: int) -> torch.Tensor:
    """``(4, n)`` crops as ``_Draws.crop`` holds them (scale x with the flip's sign, scale y, centre
    x, centre y): random sizes from 1/50 to the whole axis (areas down to 4e-4, aspect ratios up
    to 50), random positions, half flipped, then the extremes: the whole image, plain and flipped,
    and thin crops pushed into each corner."""
    g = gen(seed)
    size = torch.exp(torch.empty(2, n).uniform_(math.log(0.02), 0.0, generator=g))
    centre = (1 - size) * (2 * torch.rand(2, n, generator=g) - 1)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    crops = torch.stack((sign * size[0], size[1], centre[0], centre[1]))
    extremes = torch.tensor([
        [1.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0],
        [0.02, 1.0, 0.98, 0.0], [-1.0, 0.02, 0.0, -0.98], [0.05, 0.05, -0.95, 0.95], [-0.05, 0.05, 0.95, -0.95],
    ])
    return torch.cat((crops, extremes.T), dim=1)


@pytest.mark.parametrize(
    ("source", "out_size", "channels"),
    [((20, 20), (20, 20), 3), ((28, 28), (12, 12), 1), ((16, 24), (40, 30), 3), ((64, 64), (64, 64), 3),
     ((224, 224), (96, 96), 3)],
)
def test_crop_separable__matches_grid_sample(source: tuple[int, int], out_size: tuple[int, int], channels: int) -> None:
    """The compiled stage's crop (row gathers + column matrix product) samples what ``grid_sample``
    samples: equal to float rounding, down- and upsampling, rectangular, flipped, the smallest
    crops and those touching the borders. The two compute a source coordinate up to its last bit
    (ATen rounds its unnormalization its own way), and a shift of ``d`` pixels moves a sample of
    random uint8 noise by up to ``255 d``: after the normalization's ``1 / 127.5`` that bounds the
    difference by ``2 ulp(side - 1)``: 7.6e-6 at 64 px, 3.1e-5 at 224."""
    batch, n_views = 7, 2
    x = torch.randint(0, 256, (batch, channels, *source), dtype=torch.uint8, generator=gen(3))
    crop = _crop_draws(n_views * batch - 6, seed=sum(source) + out_size[0])
    plan = AUG._Plan(n_views, out_size, 0, False, False, False, False, False, False)
    draws = type("CropDraws", (), {"crop": crop, "sigma": torch.zeros(crop.shape[1])})()
    expected = AUG._crop(plan, x, draws)
    got = AUG._crop_separable(plan, x, draws)
    assert got.shape == expected.shape == (n_views * batch, channels, *out_size)
    ulp = 2.0 ** (math.floor(math.log2(max(source) - 1)) - 23)  # of the largest coordinate
    assert (got - expected).abs().max().item() / 127.5 < max(1e-5, 2 * ulp)
    # The full crop is the image itself when the sizes agree; flipped, the mirrored image.
    if out_size == source:
        whole, mirrored = got[n_views * batch - 6 : n_views * batch - 4]
        sample = (n_views * batch - 6) % batch
        assert torch.allclose(whole, x[sample].float(), atol=1e-3)
        assert torch.allclose(mirrored, x[(sample + 1) % batch].float().flip(-1), atol=1e-3)


@pytest.mark.parametrize(
    ("source", "out_size", "kernel"),
    [((20, 20), (20, 20), 3), ((64, 64), (64, 64), 7), ((96, 96), (32, 32), 3), ((224, 224), (96, 96), 9),
     ((16, 24), (40, 30), 5), ((12, 12), (4, 4), 23)],
)
def test_crop_separable__with_blur_matches_crop_then_blur(
    source: tuple[int, int], out_size: tuple[int, int], kernel: int
) -> None:
    """With a blur in the plan, the compiled stage's crop applies it too (per axis, a band of
    source pixels per output pixel): the same as ``grid_sample`` then :func:`gaussian_blur`, for
    per-sample sigmas from 0 (not drawn: the plain crop) to 5, down- and upsampling, the extreme
    crops, and a kernel larger than the output (gaussian_blur shrinks it). Bounded as the plain
    crop, plus float rounding of the taps' sums (1e-5 after the normalization)."""
    batch, n_views, channels = 5, 2, 3
    x = torch.randint(0, 256, (batch, channels, *source), dtype=torch.uint8, generator=gen(4))
    crop = _crop_draws(n_views * batch - 6, seed=sum(source) + kernel)
    sigma = torch.rand(crop.shape[1], generator=gen(5)) * 5
    sigma[::3] = 0.0
    plan = AUG._Plan(n_views, out_size, kernel, False, False, False, False, False, False)
    draws = type("CropDraws", (), {"crop": crop, "sigma": sigma})()
    expected = gaussian_blur(AUG._crop(plan, x, draws), sigma, kernel)
    got = AUG._crop_separable(plan, x, draws)
    assert got.shape == expected.shape
    ulp = 2.0 ** (math.floor(math.log2(max(source) - 1)) - 23)
    assert (got - expected).abs().max().item() / 127.5 < max(1e-5, 2 * ulp) + 1e-5
    plain = AUG._crop_separable(AUG._Plan(n_views, out_size, 0, False, False, False, False, False, False), x, draws)
    assert torch.allclose(got[::3], plain[::3], atol=1e-3, rtol=0)


def test_augment__full_crop_without_flip_is_identity() -> None:
    x = images()
    # A recipe that is not an identity (blur drawn with sigma ~ 0) still samples the full image exactly.
    recipe = ViewRecipe(blur_p=1.0, blur_sigma=(1e-6, 1e-6))
    (view,) = augment(x, [recipe], generator=gen())
    assert torch.allclose(view, normalize(x), atol=1e-5)


def test_augment__forced_flip_equals_flipped_crop() -> None:
    x = images(3)
    crop = ViewRecipe(scale=(0.5, 0.5), log_ratio=(-0.2, 0.2))
    (plain,) = augment(x, [crop], generator=gen(1))
    (flipped,) = augment(x, [ViewRecipe(scale=(0.5, 0.5), log_ratio=(-0.2, 0.2), flip_p=1.0)], generator=gen(1))
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, plain, atol=1e-2)


def test_augment__crop_zooms_in() -> None:
    """A crop of a quarter of the area enlarges structures: neighbouring pixels become more alike."""
    x = images(n=64)
    (full,) = augment(x, [ViewRecipe(flip_p=1.0)], generator=gen())
    (zoomed,) = augment(x, [ViewRecipe(scale=(0.25, 0.25))], generator=gen())
    assert total_variation(zoomed).mean() < 0.8 * total_variation(full).mean()


def test_augment__forced_grayscale_equalizes_channels() -> None:
    (view,) = augment(images(3), [ViewRecipe(grayscale_p=1.0)], generator=gen())
    assert torch.allclose(view[:, 0], view[:, 1]) and torch.allclose(view[:, 1], view[:, 2])


def test_augment__forced_blur_reduces_total_variation() -> None:
    x = images(n=32)
    (view,) = augment(x, [ViewRecipe(blur_p=1.0, blur_sigma=(1.0, 2.0))], generator=gen())
    assert torch.all(total_variation(view) < total_variation(normalize(x)))


def test_augment__forced_solarize_inverts_bright_pixels() -> None:
    x = images(n=8)
    (view,) = augment(x, [ViewRecipe(solarize_p=1.0)], generator=gen())
    unit_x = x.float() / 255
    expected = torch.where(unit_x >= 0.5, 1 - unit_x, unit_x)
    assert torch.allclose(unit(view), expected, atol=1e-5)


def test_augment__forced_jitter_changes_brightness() -> None:
    x = images(n=32)
    (view,) = augment(x, [ViewRecipe(jitter_p=1.0, brightness=0.4)], generator=gen())
    ratio = unit(view).sum((1, 2, 3)) / (x.float() / 255).sum((1, 2, 3))
    assert ratio.min() < 0.95 and ratio.max() > 1.0 and ratio.min() > 0.55


def test_augment__probability_zero_ops_leave_views_equal() -> None:
    x = images(3)
    recipe = ViewRecipe(scale=(0.6, 1.0), jitter_p=0.0, brightness=0.4, blur_p=0.0, grayscale_p=0.0)
    a, b = augment(x, [recipe, recipe], generator=gen())
    # Same recipe, different per-sample draws: the crops differ, but no photometric change happened.
    assert a.min() >= -1 - 1e-6 and not torch.equal(a, b)


def test_augment__views_share_draw_layout() -> None:
    """Changing one probability does not change the other draws (fixed columns of the draw)."""
    x = images()
    (a,) = augment(x, [ViewRecipe(scale=(0.5, 0.9))], generator=gen(3))
    (b,) = augment(x, [ViewRecipe(scale=(0.5, 0.9), solarize_p=1.0)], generator=gen(3))
    ua = unit(a)
    assert torch.allclose(unit(b), torch.where(ua >= 0.5, 1 - ua, ua), atol=1e-5)


def test_augment__out_size() -> None:
    (view,) = augment(images(), [ViewRecipe()], out_size=(20, 14), generator=gen())
    assert view.shape == (16, 1, 20, 14)


# ----------------------------------------------------------------------------------------------
# Elementary operations against torchvision


def test_gaussian_blur__matches_torchvision_per_sample() -> None:
    x = torch.rand(3, 3, 12, 10)
    sigma = torch.tensor([0.3, 1.0, 1.7])
    out = gaussian_blur(x, sigma, 5)
    for i in range(3):
        s = float(sigma[i])
        expected = TF.gaussian_blur(x[i : i + 1], kernel_size=[5, 5], sigma=[s, s])
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)


def test_gaussian_blur__zero_sigma_is_identity() -> None:
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(gaussian_blur(x, torch.zeros(2), 3), x)


def test_gaussian_blur__even_kernel_rejected() -> None:
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(torch.rand(1, 1, 8, 8), torch.ones(1), 4)


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.7, 1.4]),
        (adjust_hue, TF.adjust_hue, [-0.1, 0.05, 0.45]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_ops__match_torchvision_per_sample(
    ours: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    theirs: Callable[[torch.Tensor, float], torch.Tensor],
    factors: list[float],
) -> None:
    x = torch.rand(3, 3, 9, 9)
    x[0, :, 0, 0] = 0.5  # a gray pixel: hue undefined, must stay gray
    out = ours(x, torch.tensor(factors))
    for i, f in enumerate(factors):
        assert torch.allclose(out[i], theirs(x[i], f), atol=1e-5), f"factor {f}"


def test_adjust_hue__one_channel_is_identity() -> None:
    x = torch.rand(2, 1, 5, 5)
    assert torch.equal(adjust_hue(x, torch.tensor([0.2, -0.2])), x)


def test_rgb_to_grayscale__matches_torchvision() -> None:
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)


def test_solarize__inverts_only_selected_samples_above_threshold() -> None:
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 1, 3).repeat(2, 1, 1, 1)
    out = solarize(x, torch.tensor([True, False]))
    assert torch.allclose(out[0].flatten(), torch.tensor([0.2, 0.5, 0.1]))
    assert torch.equal(out[1], x[1])


def test_solarize__per_sample_threshold() -> None:
    x = torch.full((2, 1, 1, 1), 0.6)
    out = solarize(x, torch.tensor([True, True]), torch.tensor([0.5, 0.7]))
    assert torch.allclose(out.flatten(), torch.tensor([0.4, 0.6]))


# ----------------------------------------------------------------------------------------------
# Multi-crop and make_views


@pytest.mark.parametrize("channels", [1, 3])
def test_multi_crop__shapes(channels: int) -> None:
    x = images(channels)
    views = multi_crop(x, 1.0, n_local=4, generator=gen())
    assert len(views) == 6
    assert all(v.shape == (16, channels, 28, 28) for v in views[:2])
    assert all(v.shape == (16, channels, 12, 12) for v in views[2:])
    custom = multi_crop(x, 1.0, n_local=1, global_size=24, local_size=10, generator=gen())
    assert [tuple(v.shape[-2:]) for v in custom] == [(24, 24), (24, 24), (10, 10)]


def test_multi_crop__strength_zero_locals_are_resized_originals() -> None:
    x = images()
    views = multi_crop(x, 0.0, n_local=2, generator=gen())
    assert torch.equal(views[0], normalize(x)) and torch.equal(views[1], normalize(x))
    resized = F.interpolate(x.float(), size=(12, 12), mode="bilinear", align_corners=False) / 127.5 - 1
    assert torch.allclose(views[2], resized, atol=1e-4) and torch.allclose(views[3], resized, atol=1e-4)


def test_multi_crop__deterministic() -> None:
    x = images()
    a = multi_crop(x, 1.0, n_local=2, generator=gen(9))
    b = multi_crop(x, 1.0, n_local=2, generator=gen(9))
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_multi_crop__stl_sized_images() -> None:
    x = images(3, n=4, size=96)
    views = multi_crop(x, 1.0, n_local=2, generator=gen())
    assert [tuple(v.shape) for v in views] == [(4, 3, 96, 96)] * 2 + [(4, 3, 41, 41)] * 2
    assert all(torch.isfinite(v).all() for v in views)


def test_augment__tiny_outputs_shrink_the_blur_kernel() -> None:
    recipe = ViewRecipe(scale=(0.5, 1.0), blur_p=1.0, blur_kernel=9)
    for size in (1, 2, 3):
        (view,) = augment(images(n=2), [recipe], out_size=size, generator=gen())
        assert view.shape == (2, 1, size, size) and torch.isfinite(view).all()


def test_make_views__dispatch() -> None:
    x = images()
    assert len(make_views(x, "simclr", 1.0, generator=gen())) == 2
    assert len(make_views(x, "byol", 1.0, generator=gen())) == 2
    views = make_views(x, "multicrop", 1.0, n_local=3, generator=gen())
    assert len(views) == 5 and views[-1].shape[-1] == 12
    with pytest.raises(ValueError, match="n_local=2 needs recipe='multicrop'"):
        make_views(x, "simclr", 1.0, n_local=2)


# ----------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda x: two_views(x.float()), TypeError, "images must have dtype torch.uint8"),
        (lambda x: two_views(x[0]), ValueError, r"4 dimensions \(B, C, H, W\)"),
        (lambda x: two_views(x.repeat(1, 2, 1, 1)), ValueError, "1 or 3 channels"),
        (lambda x: two_views(x, 2.5), ValueError, r"strength must be in \[0, 2.0\]"),
        (lambda x: two_views(x, -0.1), ValueError, "strength must be in"),
        (lambda x: two_views(x, float("nan")), ValueError, "strength must be in"),
        (lambda x: two_views(x, "1"), TypeError, "strength must be a real number"),
        (lambda x: two_views(x, recipe="moco"), ValueError, "unknown recipe 'moco'"),
        (lambda x: make_views(x, "dino", 1.0), ValueError, "unknown recipe 'dino'"),
        (lambda x: two_views(x, mean=(0.1, 0.2)), ValueError, "mean must have 1 or 1 entries"),
        (lambda x: two_views(x, std=0.0), ValueError, "std must be positive"),
        (lambda x: multi_crop(x, n_local=-1), ValueError, "n_local must be a non-negative int"),
        (lambda x: multi_crop(x, n_local=1, local_size=0), ValueError, "local_size must be a positive int"),
        (lambda x: normalize(x.numpy()), TypeError, "images must be a torch.Tensor"),
        (lambda x: augment(x, []), ValueError, "at least one ViewRecipe"),
    ],
    ids=[
        "float-input", "3d-input", "two-channels", "strength-high", "strength-negative", "strength-nan",
        "strength-str", "recipe", "make-views-recipe", "mean-length", "std-zero", "n-local", "local-size",
        "numpy", "no-recipes",
    ],
)
def test_two_views__bad_arguments(
    call: Callable[[torch.Tensor], object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        call(images(n=2))


def test_view_recipe__rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="scale"):
        ViewRecipe(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip_p"):
        ViewRecipe(flip_p=1.5)
    with pytest.raises(ValueError, match="blur_kernel"):
        ViewRecipe(blur_kernel=4)


# ----------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_views__cuda_deterministic_and_on_device(recipe: str) -> None:
    x = images(3).cuda()
    a = make_views(x, recipe, 1.0, n_local=2 if recipe == "multicrop" else 0,
                   generator=torch.Generator("cuda").manual_seed(0))
    b = make_views(x, recipe, 1.0, n_local=2 if recipe == "multicrop" else 0,
                   generator=torch.Generator("cuda").manual_seed(0))
    assert all(v.is_cuda for v in a) and all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_views__cpu_generator_with_cuda_images() -> None:
    x = images().cuda()
    a = two_views(x, 1.0, generator=gen(2))
    b = two_views(x, 1.0, generator=gen(2))
    assert a[0].is_cuda and torch.equal(a[0], b[0])


# ----------------------------------------------------------------------------------------------
# Presets: the seed recipe everywhere, or the papers' by resolution


def test_view_recipes__seed_preset_is_the_default() -> None:
    from harness.data.augment import view_recipes

    for recipe in ("simclr", "byol", "multicrop"):
        assert view_recipes(recipe, 1.0, channels=3, image_size=32) == view_recipes(
            recipe, 1.0, channels=3, image_size=32, preset="seed"
        )


@pytest.mark.parametrize(("size", "blur_p", "kernel"), [(32, 0.0, 3), (96, 0.5, 9), (224, 0.5, 23)])
def test_view_recipes__paper_simclr_by_resolution(size: int, blur_p: float, kernel: int) -> None:
    from harness.data.augment import view_recipes

    first, second = view_recipes("simclr", 1.0, channels=3, image_size=size, preset="paper")
    assert first == second and first.scale == (0.08, 1.0) and first.blur_p == blur_p
    assert first.blur_kernel == kernel and first.jitter_p == 0.8 and first.brightness == 0.4
    assert first.grayscale_p == pytest.approx(0.2) and first.hue == pytest.approx(0.1)


@pytest.mark.parametrize(("size", "blurs"), [(32, (0.0, 0.0)), (224, (1.0, 0.1))])
def test_view_recipes__paper_byol_asymmetry_by_resolution(size: int, blurs: tuple[float, float]) -> None:
    from harness.data.augment import view_recipes

    first, second = view_recipes("byol", 1.0, channels=3, image_size=size, preset="paper")
    assert (first.blur_p, second.blur_p) == pytest.approx(blurs)
    assert first.solarize_p == 0.0 and second.solarize_p == pytest.approx(0.2)


def test_view_recipes__paper_keeps_the_meaning_of_strength() -> None:
    from harness.data.augment import local_recipe, view_recipes

    for recipe in ("simclr", "byol", "multicrop"):
        assert all(r.is_identity for r in view_recipes(recipe, 0.0, channels=3, image_size=224, preset="paper"))
    # Halfway: the crop area bound halfway to the paper's 0.08, probabilities halved.
    half = view_recipes("simclr", 0.5, channels=3, image_size=224, preset="paper")[0]
    assert half.scale[0] == pytest.approx(0.54) and half.blur_p == pytest.approx(0.25)
    assert local_recipe(1.0, channels=3, image_size=96, preset="paper").scale == pytest.approx((0.05, 0.4))
    with pytest.raises(ValueError, match="unknown augmentation preset 'papers'"):
        view_recipes("simclr", 1.0, preset="papers")


def test_multi_crop__paper_at_224_is_two_global_and_six_96px_local_views() -> None:
    from harness.data.augment import view_recipes

    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    views = multi_crop(images, 1.0, n_local=6, generator=torch.Generator().manual_seed(0), preset="paper")
    assert [tuple(v.shape[-2:]) for v in views] == [(224, 224)] * 2 + [(96, 96)] * 6
    glob = view_recipes("multicrop", 1.0, channels=3, image_size=224, preset="paper")[0]
    assert glob.scale == pytest.approx((0.4, 1.0))  # DINO's global crops


# ----------------------------------------------------------------------------------------------
# The pixel stage: CPU row subsets and the compiled stage give the full eager batch's results


def _all_ops_recipes() -> tuple[ViewRecipe, ViewRecipe]:
    """Two views that draw every operation for some samples and not for others."""
    first, second = view_recipes("byol", 1.0, channels=3, image_size=20)
    return dataclasses.replace(first, blur_p=0.5, grayscale_p=0.5), second


def test_pixels__cpu_subsets_match_full_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = images(3, n=24, size=20)
    recipes = _all_ops_recipes()
    captured: dict[str, object] = {}

    def spy(plan: object, imgs: torch.Tensor, draws: object, *, subsets: bool = False) -> torch.Tensor:
        captured.update(plan=plan, draws=draws)
        return original(plan, imgs, draws, subsets=subsets)

    original = AUG._pixels
    monkeypatch.setattr(AUG, "_pixels", spy)
    augment(x, recipes, generator=gen(4), compiled=False)
    plan, draws = captured["plan"], captured["draws"]
    assert 0 < int(draws.sigma.gt(0).sum()) < 48 and 0 < int(draws.grayscale.sum()) < 48
    assert 0 < int(draws.jitter.sum()) < 48
    subset = original(plan, x, draws, subsets=True)
    full = original(plan, x, draws, subsets=False)
    # Blur and grayscale are exact on the skipped rows; hue's HSV round trip rounds at 1e-7.
    assert torch.allclose(subset, full, atol=1e-6, rtol=0)


def test_augment__compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn: Callable[..., torch.Tensor], **options: object) -> Callable[..., torch.Tensor]:
        def run(*args: object) -> torch.Tensor:
            raise RuntimeError("no C++ compiler found\nsecond line")

        return run

    monkeypatch.setattr(AUG, "_COMPILED_PLANS", {})
    monkeypatch.setattr(AUG.torch, "compile", broken_compile)
    x = images(3, n=8, size=20)
    expected = augment(x, _all_ops_recipes(), generator=gen(1), compiled=False)
    with pytest.warns(RuntimeWarning, match="the compiled pixel stage failed .RuntimeError: no C.. compiler"):
        got = augment(x, _all_ops_recipes(), generator=gen(1), compiled=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    (entry,) = AUG.compiled_augmentation()
    assert entry["failure"] == "RuntimeError: no C++ compiler found" and entry["first_call_s"] is None
    # Later calls of the same plan go straight to the eager stage, without another warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        augment(x, _all_ops_recipes(), generator=gen(1), compiled=True)


def test_photometric_rgb__equals_the_batched_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled stage's channel-by-channel chain computes what the eager chain computes on
    whole RGB batches (every operation, solarization included, drawn on some rows and not on
    others), to float rounding."""
    x = images(3, n=24, size=12)
    captured: dict[str, object] = {}
    original = AUG._pixels

    def spy(plan: object, imgs: torch.Tensor, draws: object, *, subsets: bool = False) -> torch.Tensor:
        captured.update(plan=plan, draws=draws)
        return original(plan, imgs, draws, subsets=subsets)

    monkeypatch.setattr(AUG, "_pixels", spy)
    augment(x, _all_ops_recipes(), generator=gen(6), compiled=False)
    plan = dataclasses.replace(captured["plan"], blur_kernel=0)
    draws = captured["draws"]
    assert plan.brightness and plan.contrast and plan.saturation and plan.hue and plan.grayscale and plan.solarize
    cropped = AUG._crop(plan, x, draws)
    expected = AUG._photometric(plan, cropped.clone(), draws)
    got = torch.stack(AUG._photometric_rgb(plan, cropped, draws), dim=1)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="without blur"):
        AUG._photometric_rgb(dataclasses.replace(plan, blur_kernel=3), cropped, draws)


def test_compiled_pixels__pieces_cover_every_row_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's pieces (here 3 + 3 + 1 images per view, the stage run eagerly in place of its
    compiled form) write every row of the output once, each with its own image and draws."""
    monkeypatch.setattr(AUG, "_COMPILED_PLANS", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    monkeypatch.setattr(AUG, "_CPU_PIECE_BYTES", 3 * 3 * 20 * 20 * 4)
    x = images(3, n=7, size=20)
    expected = augment(x, _all_ops_recipes(), generator=gen(2), compiled=False)
    got = augment(x, _all_ops_recipes(), generator=gen(2), compiled=True)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("batch", "limit_images", "expected"),
    [(256, 256, 256), (256, 128, 128), (256, 100, 64), (255, 100, 85), (7, 3, 3), (100, 1000, 100), (5, 0.5, 1)],
)
def test_piece_size__fewest_cache_sized_pieces_equal_when_possible(
    monkeypatch: pytest.MonkeyPatch, batch: int, limit_images: float, expected: int
) -> None:
    per_image = 1000
    monkeypatch.setattr(AUG, "_CPU_PIECE_BYTES", int(limit_images * per_image))
    assert AUG._piece_size(batch, per_image) == expected


def test_use_compiled_augmentation__sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(AUG, "_compiled_pixels", lambda plan, imgs, draws: calls.append(plan))
    monkeypatch.setitem(AUG._COMPILED, "enabled", False)
    x = images(n=4)
    two_views(x, 1.0, generator=gen())
    assert calls == []
    AUG.use_compiled_augmentation(True)
    two_views(x, 1.0, generator=gen())
    assert len(calls) == 1  # a None from the compiled stage means "ran eagerly instead"
    two_views(x, 1.0, generator=gen(), compiled=False)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="enabled must be a bool"):
        AUG.use_compiled_augmentation(1)  # type: ignore[arg-type]


@pytest.mark.slow
def test_augment__compiled_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile (inductor, C++ on the CPU) of the pixel stage: the same views up to float
    rounding, deterministic, its first call's time recorded."""
    monkeypatch.setattr(AUG, "_COMPILED_PLANS", {})
    x = images(3, n=8, size=20)
    # In pieces of 4 images, as a batch larger than the cache runs.
    monkeypatch.setattr(AUG, "_CPU_PIECE_BYTES", 4 * 3 * 20 * 20 * 4)
    expected = augment(x, _all_ops_recipes(), generator=gen(2), compiled=False)
    got = augment(x, _all_ops_recipes(), generator=gen(2), compiled=True)
    again = augment(x, _all_ops_recipes(), generator=gen(2), compiled=True)
    (entry,) = AUG.compiled_augmentation()
    assert entry["failure"] is None and entry["first_call_s"] > 0
    for a, b, c in zip(got, expected, again):
        assert torch.allclose(a, b, atol=1e-5, rtol=0) and torch.equal(a, c)


def test_profile_augment_stages__times_every_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.data.pipeline_bench import profile_augment_stages

    # The compiled chain's own equality is checked above; here the eager function stands in for it.
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    monkeypatch.setattr(AUG, "_COMPILED_PLANS", {})
    times = profile_augment_stages(batch_size=4, size=20, repeats=1)
    assert set(times) == {
        "crop (grid_sample)", "crop, separable, eager", "crop, separable, compiled",
        "crop + blur (kernel 3), separable, compiled", "copy of the cropped batch",
        "eager blur (kernel 3), every row", "eager brightness, every row", "eager contrast, every row",
        "eager saturation, every row", "eager hue, every row", "eager grayscale, every row",
        "eager chain, every row (GPU)", "eager chain, CPU row subsets", "compiled chain (blur as its own pass)",
        "compiled stage, whole batch", "compiled stage in pieces (compiled=True)", "compile_first_call_s",
        "compile_stage_first_call_s",
    }
    assert all(value > 0 for value in times.values())
