"""Data sets and transforms for training: digits, synthetic, CIFAR and image folders.

Every random augmentation is seeded by (run seed, epoch, sample index), not by whichever process
or worker loads the sample, so a resumed run, more workers or more processes see the same images.
The data sets: ``docs/training.md``, "Data sets".
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dgc_convert.errors import DataError
from dgc_convert.measuring.memory import available_memory, require_memory
from dgc_convert.training.recipe import DataSection

__all__ = [
    "DataError",
    "DataBundle",
    "SeededAugmentation",
    "build_data",
    "dataset_classes",
    "train_set_size",
    "native_image_size",
]

_DIGITS_SAMPLES = 1797
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # fixed: the held-out set must not move with the run's seed
_SYNTHETIC_TEMPLATE_SEED = 1234
# Building an in-memory set holds its resized images, a transformed copy and the
# split copies at its peak: this many float32 copies of every image.
_IN_MEMORY_COPIES = 3
_CIFAR = {
    "cifar10": ("CIFAR10", 10, "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 100, "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_TRAIN_SIZE = 50_000


@dataclass
class DataBundle:
    """Training and held-out sets of one recipe."""

    train: SeededAugmentation
    val: Dataset
    num_classes: int
    image_size: int
    channels: int = 3


class SeededAugmentation(Dataset):
    """Wrap a data set so that its random transform is seeded per (seed, epoch, index).

    Call ``set_epoch`` before iterating an epoch. The transform may use
    torch's and Python's global random generators (torchvision and timm
    transforms do); both are restored afterwards, so the training process's
    own random streams are untouched.
    """

    def __init__(self, base: Dataset, transform: Callable | None, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation stream of ``epoch`` (0-based)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        if self.transform is None:
            return image, label
        sample_seed = hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF
        cpu_state = torch.get_rng_state()
        python_state = random.getstate()
        try:
            # Only the CPU generator: torch.manual_seed would also reseed CUDA.
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            return self.transform(image), label
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(python_state)


class _TensorSet(Dataset):
    """Images (N, C, H, W) as one float tensor, labels as ints; channels expand to 3 on read."""

    def __init__(self, images: Tensor, labels: Tensor, channels: int = 3) -> None:
        self.images = images
        self.labels = labels
        self.channels = channels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if image.shape[0] != self.channels:
            image = image.expand(self.channels, -1, -1)
        return image, int(self.labels[index])


def native_image_size(data: DataSection) -> int | None:
    """The side the data set is usually trained at: 32 for digits, synthetic and CIFAR; None for image folders."""
    return None if data.dataset == "imagefolder" else 32


def _tensor_augmentation(kind: str, dataset: str, size: int) -> Callable | None:
    from torchvision.transforms import v2

    if kind == "standard":
        # Digits are not mirror-symmetric, so their usual augmentation is a
        # small shift only; synthetic data stays as generated.
        kind = {"digits": "crop", "synthetic": "none"}.get(dataset, "crop_flip")
    steps: list[nn.Module] = []
    if kind in ("crop", "crop_flip"):
        steps.append(v2.RandomCrop(size, padding=max(1, size // 8)))
    if kind in ("flip", "crop_flip"):
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else None


def _require_room(dataset: str, samples: int, channels: int, size: int, advice: str) -> None:
    """Refuse, in one line, an in-memory set whose float32 images would not fit while it is built."""
    require_memory(
        _IN_MEMORY_COPIES * samples * channels * size * size * 4,
        available_memory(),
        doing=f"data.dataset={dataset} at {size}x{size} would hold about",
        held="images in memory",
        advice=advice,
    )


def _digits(size: int) -> tuple[_TensorSet, _TensorSet]:
    _require_room("digits", _DIGITS_SAMPLES, 1, size, "lower data.image_size")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError(
            "data.dataset=digits needs scikit-learn, which ships the digits: "
            "pip install scikit-learn (or pip install 'dgc-convert[digits]')"
        ) from None
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_index, val_index = train_test_split(
        list(range(len(labels))),
        test_size=_DIGITS_VAL_FRACTION,
        random_state=_DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_images = images[train_index]
    mean, std = train_images.mean(), train_images.std()
    images = (images - mean) / std
    return (
        _TensorSet(images[train_index], labels[train_index]),
        _TensorSet(images[val_index], labels[val_index]),
    )


def _synthetic(size: int, num_classes: int, samples: int) -> tuple[_TensorSet, _TensorSet]:
    """Learnable, deterministic data: a smooth random template per class plus noise."""
    _require_room("synthetic", 2 * samples, 3, size, "lower data.image_size or data.synthetic_size")
    templates_generator = torch.Generator().manual_seed(_SYNTHETIC_TEMPLATE_SEED)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=templates_generator)
    templates = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def split(seed: int) -> _TensorSet:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(samples) % num_classes
        labels = labels[torch.randperm(samples, generator=generator)]
        noise = torch.randn(samples, 3, size, size, generator=generator)
        return _TensorSet(templates[labels] + 0.5 * noise, labels)

    return split(1), split(2)


def _cifar(data: DataSection, size: int) -> tuple[Dataset, Dataset, Callable | None, int]:
    import torchvision
    from torchvision.transforms import v2

    class_name, classes, folder, mean, std = _CIFAR[data.dataset]
    dataset_class = getattr(torchvision.datasets, class_name)
    root = Path(data.root or ".").expanduser()
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if size != 32:
        steps.append(v2.Resize(size, antialias=True))
    steps.append(v2.Normalize(mean, std))
    to_tensor = v2.Compose(steps)
    try:
        train = dataset_class(str(root), train=True, download=data.download, transform=to_tensor)
        val = dataset_class(str(root), train=False, download=data.download, transform=to_tensor)
    except RuntimeError as error:
        if "not found" in str(error).lower() or "corrupted" in str(error).lower():
            raise DataError(
                f"data.root={str(root)!r}: {class_name} not found there (expected {folder}/); "
                f"set data.download: true (or --set data.download=true) to fetch it"
            ) from None
        raise DataError(f"data.root={str(root)!r}: cannot read {class_name}: {error}") from None
    except OSError as error:
        raise DataError(f"data.root={str(root)!r}: cannot fetch {class_name}: {error}") from None
    return train, val, _tensor_augmentation(data.augmentation, data.dataset, size), classes


def _imagefolder(
    data: DataSection, size: int, model: nn.Module | None
) -> tuple[Dataset, Dataset, Callable | None, int]:
    import torchvision
    from timm.data import create_transform, resolve_data_config

    root = _image_folder_split(data, "train").parent
    _image_folder_split(data, "val")
    config = resolve_data_config({"input_size": (3, size, size)}, model=model)
    eval_transform = create_transform(**config, is_training=False)
    if data.augmentation == "none":
        train_transform = eval_transform
    elif data.augmentation == "flip":
        from torchvision.transforms import v2

        train_transform = v2.Compose([v2.RandomHorizontalFlip(), eval_transform])
    else:
        # The paper's ImageNet augmentation: random-resized crop + flip, no colour jitter.
        train_transform = create_transform(**config, is_training=True, color_jitter=0.0)
    try:
        train = torchvision.datasets.ImageFolder(str(root / "train"))
        val = torchvision.datasets.ImageFolder(str(root / "val"), transform=eval_transform)
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"data.root={str(root)!r}: {error}") from None
    if train.classes != val.classes:
        raise DataError(f"data.root={str(root)!r}: train/ and val/ have different class folders")
    return train, val, train_transform, len(train.classes)


def _image_folder_split(data: DataSection, split: str) -> Path:
    """``root/split`` of an image-folder data set, or a DataError naming both folders it needs."""
    root = Path(data.root or ".").expanduser()
    if not (root / split).is_dir():
        raise DataError(
            f"data.root={str(root)!r}: no {split}/ there; expected class folders in {root / 'train'}/ and {root / 'val'}/"
        )
    return root / split


def _image_folder_classes(data: DataSection) -> tuple[Path, dict[str, int]]:
    """(``root/train``, class name -> index) without reading any image."""
    import torchvision

    train = _image_folder_split(data, "train")
    try:
        _, class_to_index = torchvision.datasets.folder.find_classes(str(train))
    except FileNotFoundError as error:  # no class folders inside
        raise DataError(f"data.root={str(train.parent)!r}: {error}") from None
    return train, class_to_index


def train_set_size(data: DataSection) -> int:
    """Training samples of the data set, found without loading images (counts files for image folders)."""
    if data.dataset == "synthetic":
        return data.synthetic_size
    if data.dataset == "digits":
        return _DIGITS_SAMPLES - math.ceil(
            _DIGITS_SAMPLES * _DIGITS_VAL_FRACTION
        )  # scikit-learn rounds the test share up
    if data.dataset in _CIFAR:
        return _CIFAR_TRAIN_SIZE
    import torchvision

    root, class_to_index = _image_folder_classes(data)
    return len(
        torchvision.datasets.folder.make_dataset(str(root), class_to_index, torchvision.datasets.folder.IMG_EXTENSIONS)
    )


def dataset_classes(data: DataSection, num_classes: int | None = None) -> int:
    """Number of classes of the data set (``num_classes``, or 10, for synthetic), without loading it."""
    if data.dataset == "digits":
        return 10
    if data.dataset == "synthetic":
        return num_classes or 10
    if data.dataset in _CIFAR:
        return _CIFAR[data.dataset][1]
    return len(_image_folder_classes(data)[1])


def build_data(
    data: DataSection, *, image_size: int, num_classes: int | None, seed: int, model: nn.Module | None = None
) -> DataBundle:
    """Build the training and held-out sets of a recipe's ``data`` section.

    Args:
        data: the recipe's data section.
        image_size: square side in pixels the model is trained at.
        num_classes: classes the model expects; None takes the data set's.
            (Synthetic data makes this many classes, 10 when None.)
        seed: the run's seed, which drives the augmentation stream.
        model: the model, whose timm data config sets image-folder transforms.
    """
    train: Dataset[Any]
    val: Dataset[Any]
    if data.dataset == "digits":
        train, val = _digits(image_size)
        classes, augmentation = 10, _tensor_augmentation(data.augmentation, "digits", image_size)
    elif data.dataset == "synthetic":
        classes = num_classes or 10
        train, val = _synthetic(image_size, classes, data.synthetic_size)
        augmentation = _tensor_augmentation(data.augmentation, "synthetic", image_size)
    elif data.dataset in _CIFAR:
        train, val, augmentation, classes = _cifar(data, image_size)
    else:
        train, val, augmentation, classes = _imagefolder(data, image_size, model)
    if num_classes is not None and num_classes != classes:
        raise DataError(
            f"model.num_classes={num_classes} but data.dataset={data.dataset} has {classes} classes; "
            f"drop model.num_classes or make them agree"
        )
    return DataBundle(SeededAugmentation(train, augmentation, seed), val, classes, image_size)
