"""Datasets as uint8 tensors (device-resident, or streamed from host memory and memory-mapped
shards), and batched on-device augmentation.

Public API::

    from harness.data import load_dataset, two_views, make_views, multi_crop, normalize, iter_batches

See docs/DATA.md for the datasets, the augmentation recipes and the strength table.
"""

from __future__ import annotations

from harness.data.augment import (
    PRESETS,
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
    FOLDER_DATASETS,
    SPLITS,
    DatasetNotFoundError,
    ImageDataset,
    balanced_subset_indices,
    cache_dir,
    clear_cache,
    load_dataset,
)
from harness.data.stream import fits_on_device, iter_batches

__all__ = [
    "DATASETS",
    "FOLDER_DATASETS",
    "PRESETS",
    "RECIPES",
    "SPLITS",
    "DatasetNotFoundError",
    "ImageDataset",
    "ViewRecipe",
    "augment",
    "balanced_subset_indices",
    "cache_dir",
    "clear_cache",
    "fits_on_device",
    "iter_batches",
    "load_dataset",
    "local_recipe",
    "make_views",
    "multi_crop",
    "normalize",
    "two_views",
    "view_recipes",
]
