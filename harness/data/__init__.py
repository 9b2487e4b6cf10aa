"""Datasets as device-resident uint8 tensors, and batched on-device augmentation.

Public API::

    from harness.data import load_dataset, two_views, make_views, multi_crop, normalize

See docs/DATA.md for the datasets, the augmentation recipes and the strength table.
"""

from __future__ import annotations

from harness.data.augment import (
    RECIPES,
    ViewRecipe,
    augment,
    local_recipe,
    make_views,
    multi_crop,
    normalize,
    two_views,
    view_recipes,
)
from harness.data.datasets import (
    DATASETS,
    SPLITS,
    DatasetNotFoundError,
    ImageDataset,
    balanced_subset_indices,
    cache_dir,
    clear_cache,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "RECIPES",
    "SPLITS",
    "DatasetNotFoundError",
    "ImageDataset",
    "ViewRecipe",
    "augment",
    "balanced_subset_indices",
    "cache_dir",
    "clear_cache",
    "load_dataset",
    "local_recipe",
    "make_views",
    "multi_crop",
    "normalize",
    "two_views",
    "view_recipes",
]
