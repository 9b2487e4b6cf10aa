"""The datasets' own on-disk formats (CIFAR pickle batches, STL-10 binaries, image folders) and the
prepared shards: files are written here in exactly those formats, then read back."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_writers import write_cifar10, write_folder, write_stl10

from harness.data import DatasetNotFoundError, load_dataset
from harness.data.formats import (
    DataFormatError,
    decode_image,
    imagenet100_classes,
    list_image_folder,
    read_cifar,
    read_stl10,
)
from harness.data.shards import ShardError, StaleShardError, ensure_shard, open_shard, prepare_shard

Image = pytest.importorskip("PIL.Image")


# ----------------------------------------------------------------------------------------------
# CIFAR and STL-10


def test_read_cifar__ten_classes_from_the_pickle_batches(tmp_path: Path) -> None:
    expected, labels = write_cifar10(tmp_path)
    images, got_labels, names = read_cifar(tmp_path / "cifar-10-batches-py", "train", hundred=False)
    assert images.shape == (100, 3, 32, 32) and images.dtype == np.uint8
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major.
    assert np.array_equal(images.reshape(100, -1), expected) and np.array_equal(got_labels, labels)
    assert names[0] == "airplane" and len(names) == 10


def test_load_dataset__cifar10_from_a_root(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", "test", root=tmp_path)
    assert ds.images.shape == (20, 3, 32, 32) and ds.class_names[-1] == "truck" and ds.num_classes == 10


def test_read_cifar__hundred_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    for split in ("train", "test"):
        with open(folder / split, "wb") as handle:
            pickle.dump({b"data": data, b"fine_labels": [0, 99, 5, 7], b"coarse_labels": [0, 1, 2, 3]}, handle, protocol=2)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}, handle)
    ds = load_dataset("cifar100", "train", root=tmp_path)
    assert ds.labels.tolist() == [0, 99, 5, 7] and ds.num_classes == 100 and ds.class_names[99] == "c99"


def test_read_cifar__malformed_batch_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(bad, "wb") as handle:
        pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, handle)
    with pytest.raises(DataFormatError, match=r"data_batch_3.*uint8 \(N, 3072\)"):
        read_cifar(tmp_path / "cifar-10-batches-py", "train", hundred=False)


def test_read_stl10__binary_files_column_major_and_unlabeled(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    for split in ("train", "test", "unlabeled"):
        images, labels, names = read_stl10(tmp_path / "stl10_binary", split)
        assert np.array_equal(images, written[split])
        expected = written.get(f"{split}_y", np.full(len(written[split]), -1))
        assert np.array_equal(labels, expected) and names[2] == "car"


def test_load_dataset__stl10_unlabeled_is_a_memory_map(tmp_path: Path) -> None:
    written = write_stl10(tmp_path)
    ds = load_dataset("stl10", "unlabeled", root=tmp_path)
    assert ds.mapped and ds.images.shape == (16, 3, 96, 96) and (ds.labels == -1).all()
    assert torch.equal(ds.images[[3, 1]], torch.from_numpy(written["unlabeled"][[3, 1]]))
    resident = ds.resident("cpu")
    assert not resident.mapped and torch.equal(resident.images, ds.images)


def test_read_stl10__truncated_file_is_named(tmp_path: Path) -> None:
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "train_X.bin"
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(DataFormatError, match=r"train_X.bin.*multiple of 27648"):
        read_stl10(tmp_path / "stl10_binary", "train")


def test_load_dataset__cifar10_has_no_unlabeled_split(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match="cifar10 has no unlabeled split"):
        load_dataset("cifar10", "unlabeled", root=tmp_path)


# ----------------------------------------------------------------------------------------------
# Image folders


def test_list_image_folder__classes_sorted_and_counted(tmp_path: Path) -> None:
    write_folder(tmp_path, {"b": 2, "a": 3})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    listing = list_image_folder(tmp_path)
    assert listing.class_names == ("a", "b") and listing.labels.tolist() == [0, 0, 0, 1, 1]
    assert listing.class_counts() == {"a": 3, "b": 2} and listing.files[0] == "a/0000.png"


def test_list_image_folder__empty_class_folder_is_an_error(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"class folder .*empty has no images"):
        list_image_folder(tmp_path)


def test_list_image_folder__loose_images_are_unlabeled(tmp_path: Path) -> None:
    write_folder(tmp_path, {"x": 3})
    listing = list_image_folder(tmp_path / "x")
    assert not listing.labeled and listing.labels.tolist() == [-1, -1, -1]


def test_decode_image__resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # a white centre band, exactly what the centre crop keeps
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    array, mode = decode_image(tmp_path / "wide.png", 10, 3)
    assert mode == "RGB" and array.shape == (3, 10, 10)
    assert array[:, :, 1:-1].min() >= 250  # the 20x20 centre scaled by 1/2 is white but for its edges


def test_decode_image__modes_are_converted(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(tmp_path / "g.png")
    array, mode = decode_image(tmp_path / "a.png", 8, 3)
    assert mode == "RGBA" and array[0].min() == 200 and array[1].max() == 0  # alpha dropped
    gray, mode = decode_image(tmp_path / "g.png", 8, 3)
    assert mode == "L" and (gray == 77).all() and gray.shape == (3, 8, 8)


def test_imagenet100_classes__the_cmc_list() -> None:
    classes = imagenet100_classes()
    assert len(classes) == len(set(classes)) == 100
    assert classes[0] == "n02869837" and classes[-1] == "n02090622"
    assert all(c.startswith("n") and len(c) == 9 for c in classes)


# ----------------------------------------------------------------------------------------------
# Shards


def test_prepare_shard__equals_decoding_every_file(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", {"cat": 5, "dog": 4}, size=(20, 16))
    meta = prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=12, workers=1, progress=False)
    images, labels, opened = open_shard(tmp_path / "shard", source=tmp_path / "src")
    assert opened == meta and meta.count == 9 and meta.channels == 3 and meta.resolution == 12
    assert meta.class_names == ("cat", "dog") and meta.class_counts == {"cat": 5, "dog": 4}
    assert labels.tolist() == [0] * 5 + [1] * 4
    listing = list_image_folder(tmp_path / "src")
    for i, rel in enumerate(listing.files):
        assert np.array_equal(images[i], decode_image(tmp_path / "src" / rel, 12, 3)[0])
    values = images.astype(np.float64) / 255
    assert np.allclose(meta.mean, values.mean(axis=(0, 2, 3)), atol=1e-5)


def test_prepare_shard__grayscale_folder_gives_one_channel(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", {"a": 3}, mode="L")
    meta = prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, progress=False)
    assert meta.channels == 1 and meta.converted == {}


def test_prepare_shard__mixed_modes_convert_to_rgb_and_are_counted(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", {"a": 2}, mode="L")
    write_folder(tmp_path / "src", {"b": 3}, mode="RGBA", seed=1)
    write_folder(tmp_path / "src", {"c": 1}, mode="RGB", seed=2)
    meta = prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, progress=False)
    assert meta.channels == 3 and meta.converted == {"L": 2, "RGBA": 3}
    assert "2 converted from L" in meta.describe()


def test_prepare_shard__unreadable_image_skipped_and_named(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", {"a": 3, "b": 3})
    (tmp_path / "src" / "a" / "0001.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) skipped, e.g. a/0001.png"):
        meta = prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, progress=False)
    images, labels, _ = open_shard(tmp_path / "shard")
    assert meta.count == 5 and labels.tolist() == [0, 0, 1, 1, 1] and meta.skipped[0][0] == "a/0001.png"
    # The rows after the hole moved up: image 1 of the shard is the file a/0002.png.
    assert np.array_equal(images[1], decode_image(tmp_path / "src" / "a" / "0002.png", 8, 3)[0])
    assert meta.class_counts == {"a": 2, "b": 3}


def test_prepare_shard__unreadable_image_fatal_by_flag(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", {"a": 3})
    (tmp_path / "src" / "a" / "0002.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match=r"unreadable image .*a/0002.png"):
        prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, on_bad_image="error", progress=False)
    with pytest.raises(ShardError, match=r"no complete shard .*interrupted"):
        open_shard(tmp_path / "shard")


def test_open_shard__stale_source_detected_and_ensure_reprepares(tmp_path: Path) -> None:
    write_folder(tmp_path / "src", {"a": 2, "b": 2})
    prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, progress=False)
    write_folder(tmp_path / "src", {"b": 3}, seed=5)  # rewrites b/0000, b/0001 and adds b/0002
    with pytest.raises(StaleShardError, match="different version"):
        open_shard(tmp_path / "shard", source=tmp_path / "src")
    images, labels, meta = ensure_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1)
    assert meta.count == 5 and labels.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(images[4], decode_image(tmp_path / "src" / "b" / "0002.png", 8, 3)[0])


def test_prepare_shard__resumes_from_its_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.data.shards as shards

    monkeypatch.setattr(shards, "CHUNK", 4)
    write_folder(tmp_path / "src", {"a": 6, "b": 6})
    calls: list[int] = []
    real = shards._decode_chunk

    def interrupted(task: tuple) -> tuple:
        calls.append(task[0])
        if task[0] == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(shards, "_decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, progress=False)
    assert json.loads((tmp_path / "shard" / "progress.json").read_text())["done"] == [0, 1]
    calls.clear()
    monkeypatch.setattr(shards, "_decode_chunk", real)
    monkeypatch.setattr(shards, "_decode_chunk", lambda task: (calls.append(task[0]), real(task))[1])
    meta = prepare_shard(tmp_path / "src", tmp_path / "shard", resolution=8, workers=1, progress=False)
    assert calls == [2] and meta.count == 12 and not (tmp_path / "shard" / "progress.json").exists()
    fresh = prepare_shard(tmp_path / "src", tmp_path / "fresh", resolution=8, workers=1, progress=False)
    assert fresh.fingerprint == meta.fingerprint
    assert np.array_equal(open_shard(tmp_path / "shard")[0], open_shard(tmp_path / "fresh")[0])


@pytest.mark.slow
def test_prepare_shard__parallel_workers_equal_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.data.shards as shards

    monkeypatch.setattr(shards, "CHUNK", 8)
    write_folder(tmp_path / "src", {"a": 20, "b": 20}, ext="jpg")
    prepare_shard(tmp_path / "src", tmp_path / "one", resolution=16, workers=1, progress=False)
    prepare_shard(tmp_path / "src", tmp_path / "two", resolution=16, workers=2, progress=False)
    assert np.array_equal(open_shard(tmp_path / "one")[0], open_shard(tmp_path / "two")[0])


def test_load_dataset__imagefolder_train_and_val_through_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    write_folder(tmp_path / "data" / "train", {"a": 4, "b": 4})
    write_folder(tmp_path / "data" / "val", {"a": 2, "b": 2}, seed=3)
    train = load_dataset("imagefolder", "train", root=tmp_path / "data", image_size=16)
    test = load_dataset("imagefolder", "test", root=tmp_path / "data", image_size=16)
    assert train.images.shape == (8, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)
    assert train.mapped and train.class_names == ("a", "b") and train.num_classes == 2
    assert test.mean == train.mean and train.source.class_counts == {"a": 4, "b": 4}
    with pytest.raises(DatasetNotFoundError, match=r"unlabeled/"):
        load_dataset("imagefolder", "unlabeled", root=tmp_path / "data", image_size=16)


def test_load_dataset__imagenet100_requires_every_listed_class(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", {"n02869837": 1, "n01749939": 1})
    with pytest.raises(FileNotFoundError, match="98 of the 100 listed class folders are missing"):
        load_dataset("imagenet100", "train", root=tmp_path, image_size=8)


@pytest.mark.slow
def test_harness_data_prepare__cli_prepares_then_reports_up_to_date(tmp_path: Path) -> None:
    write_folder(tmp_path / "data" / "train", {"a": 3, "b": 2})
    env = {**os.environ, "HARNESS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "harness", "data", "prepare", "imagefolder", "--root", str(tmp_path / "data"),
               "--image-size", "8", "--workers", "1"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert first.returncode == 0, first.stderr
    assert "5 images 3x8x8, 2 classes" in first.stdout and "prepared" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert second.returncode == 0 and "up to date" in second.stdout
    missing = subprocess.run([*command[:7], str(tmp_path / "nowhere"), *command[8:]], capture_output=True, text=True, env=env, check=False)
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_shard_pipeline_rates__measures_a_prepared_shard_on_the_device(tmp_path: Path) -> None:
    """The GPU goal's measurement (scripts/shard_pipeline.py), here eager on the CPU at 24 px:
    the generated folder is written at 8/7 of the size, prepared, and every epoch sees every image."""
    from harness.data.pipeline_bench import shard_pipeline_rates

    figures = shard_pipeline_rates(
        tmp_path, image_size=24, n_images=48, batch_size=16, device="cpu", epochs=1, compiled=False, workers=1
    )
    assert figures["image_size"] == 24 and figures["n_images"] == 48 and figures["device"].startswith("cpu")
    assert figures["eager_images_per_s"] > 0 and figures["eager_first_epoch_s"] > 0
    assert "compiled_images_per_s" not in figures
    assert {p.suffix for p in (tmp_path / "train").rglob("*.*")} == {".jpg"}
    assert (tmp_path / "shard-24").is_dir()
