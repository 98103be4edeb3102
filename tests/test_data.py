"""Data sets: digits split, seeded augmentation, synthetic, CIFAR and image-folder errors."""

import random

import pytest
import torch

from dgc_convert.errors import DGCConvertError
from dgc_convert.training.data import DataError, build_data, dataset_classes, train_set_size
from dgc_convert.training.recipe import DataSection


@pytest.fixture(scope="module")
def digits():
    return build_data(DataSection(dataset="digits"), image_size=32, num_classes=None, seed=0)


def test_digits_are_real_resized_and_split_the_same_way_every_time(digits):
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert len(digits.train) == train_set_size(DataSection(dataset="digits"))
    image, label = digits.val[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    again = build_data(DataSection(dataset="digits"), image_size=32, num_classes=None, seed=99)
    assert torch.equal(again.val[17][0], digits.val[17][0])  # held-out set does not move with the seed
    labels = torch.tensor([digits.val[i][1] for i in range(len(digits.val))])
    assert torch.bincount(labels, minlength=10).min() >= 34  # stratified: every digit held out


def test_augmentation_is_seeded_by_seed_epoch_and_index_and_leaves_global_rng_alone(digits):
    data = digits.train
    torch.manual_seed(5)
    random.seed(5)
    expected_torch, expected_python = torch.rand(3), random.random()
    torch.manual_seed(5)
    random.seed(5)
    data.set_epoch(0)
    first = data[11][0]
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_python
    assert torch.equal(data[11][0], first)  # same (seed, epoch, index): same image
    data.set_epoch(1)
    assert not torch.equal(data[11][0], first)  # a new epoch shifts differently
    data.set_epoch(0)


def test_synthetic_is_deterministic_and_sized_by_the_recipe():
    section = DataSection(dataset="synthetic", synthetic_size=40)
    a = build_data(section, image_size=16, num_classes=4, seed=0)
    b = build_data(section, image_size=16, num_classes=4, seed=0)
    assert len(a.train) == 40 and a.num_classes == 4 and a.train[0][0].shape == (3, 16, 16)
    assert torch.equal(a.train[7][0], b.train[7][0]) and not torch.equal(a.train[7][0], a.val[7][0])


def test_num_classes_that_disagree_with_the_data_set():
    with pytest.raises(DataError, match="model.num_classes=7 but data.dataset=digits has 10 classes"):
        build_data(DataSection(dataset="digits"), image_size=16, num_classes=7, seed=0)


def test_missing_cifar_without_download_says_how_to_fix_it(tmp_path):
    section = DataSection(dataset="cifar10", root=str(tmp_path))
    with pytest.raises(DataError) as error:
        build_data(section, image_size=32, num_classes=None, seed=0)
    message = str(error.value)
    assert "CIFAR10 not found" in message and "data.download" in message and "\n" not in message


def test_missing_image_folder(tmp_path):
    section = DataSection(dataset="imagefolder", root=str(tmp_path))
    with pytest.raises(DataError, match="expected class folders"):
        build_data(section, image_size=32, num_classes=None, seed=0)


def test_image_folder_uses_timm_transforms(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 90, 40, 200)).save(folder / f"{i}.png")
    section = DataSection(dataset="imagefolder", root=str(tmp_path))
    assert dataset_classes(section) == 2 and train_set_size(section) == 4
    bundle = build_data(section, image_size=32, num_classes=None, seed=0)
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert bundle.val[3][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    "section, size, message",
    [
        (
            {"dataset": "digits"},
            4096,
            r"^data\.dataset=digits at 4096x4096 would hold about 336\.9 GiB of images in memory and .* is "
            r"available; lower data\.image_size$",
        ),
        (
            {"dataset": "synthetic", "synthetic_size": 10**8},
            32,
            r"^data\.dataset=synthetic at 32x32 would hold about \d+\.\d GiB of images in memory and .* is "
            r"available; lower data\.image_size or data\.synthetic_size$",
        ),
    ],
)
def test_an_in_memory_set_that_cannot_fit_is_refused_before_it_is_built(section, size, message):
    import time

    start = time.perf_counter()
    with pytest.raises(DGCConvertError, match=message):
        build_data(DataSection(**section), image_size=size, num_classes=10, seed=0)
    assert time.perf_counter() - start < 5  # nothing was allocated
