"""Datasets for the iMixer example: embedded digits, CIFAR-10/100, Food-101 and image folders; train.py's loaders.

Every builder returns PIL images, so the same ``timm.data.create_transform`` pipelines (RandAugment,
random erasing, interpolation, normalisation) apply to all of them. Missing or malformed data raise
:class:`DataError` with one line that names the expected layout, and an image file that cannot be read raises
it naming the file (the run stops rather than train or evaluate on a silently different set); train.py turns it
into exit status 2. Besides :data:`DATASETS`, timm's spellings (``torch/cifar10``, ``torch/image_folder``, ...)
are accepted (:func:`canonical`).
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import timm
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from examples.common import UsageError, first_line

DATASETS = ("digits", "cifar10", "cifar100", "food101", "imagefolder")

# timm's train.py names torchvision datasets "torch/<name>" and folder datasets "torch/image_folder",
# "torch/folder" or "" (with a data dir); these spellings are accepted for the names above.
DATASET_ALIASES = {
    "torch/cifar10": "cifar10",
    "torch/cifar100": "cifar100",
    "torch/food101": "food101",
    "torch/image_folder": "imagefolder",
    "torch/folder": "imagefolder",
    "torch/imagefolder": "imagefolder",
    "image_folder": "imagefolder",
    "folder": "imagefolder",
    "": "imagefolder",
}

# What a damaged image file raises when PIL opens or decodes it: UnidentifiedImageError (an OSError) for a
# file that is no image, OSError for a truncated one, SyntaxError from some format parsers, and
# DecompressionBombError (a plain Exception) for absurd dimensions.
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Expected on-disk layouts, quoted in the error raised when data are missing.
LAYOUTS = {
    "cifar10": "DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (torchvision layout)",
    "cifar100": "DATA_DIR/cifar-100-python/{train,test,meta} (torchvision layout)",
    "food101": "DATA_DIR/food-101/{images/<class>/*.jpg,meta/train.json,meta/test.json} (torchvision layout)",
    "imagefolder": "DATA_DIR/train/<class>/<image> and DATA_DIR/val/<class>/<image>",
}

Transform = Callable[[Image.Image], object]


def canonical(name: str) -> str | None:
    """The dataset name of :data:`DATASETS` that ``name`` spells (case-insensitive), or None."""
    lowered = name.strip().lower()
    return lowered if lowered in DATASETS else DATASET_ALIASES.get(lowered)


class DataError(Exception):
    """Data are missing or malformed; the message is one line naming what was expected.

    Raised in a DataLoader worker, PyTorch re-raises it in the main process as
    ``DataError("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...")``; the
    constructor keeps only the original one-line message from such a text.
    """

    def __init__(self, message: str = "") -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = last.split("DataError: ", 1)[-1]
        super().__init__(message)


@dataclass
class DatasetSplits:
    """A training and a validation dataset of (image, label) pairs.

    Attributes:
        train: Training split, transformed by the training transform.
        val: Validation split, transformed by the eval transform.
        num_classes: Number of classes.
        in_chans: Channels of the images (1 for digits, 3 otherwise).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int


class DigitsDataset(Dataset):
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes), no download.

    A fixed, seeded, stratified split keeps 20 % (360 images) for validation, so every run and every
    process sees the same split.

    Args:
        train: The training (80 %) or the validation (20 %) split.
        transform: Applied to each 8×8 grayscale PIL image.
        split_seed: Seed of the stratified split.
    """

    def __init__(self, train: bool, transform: Transform | None = None, split_seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        # Pixel values are 0..16; scale to 0..255 so the images look like any other 8-bit image.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train_idx, val_idx = train_test_split(
            np.arange(len(images)), test_size=0.2, random_state=split_seed, stratify=digits.target
        )
        indices = train_idx if train else val_idx
        self.images = images[indices]
        self.targets = digits.target[indices].astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = Image.fromarray(self.images[index], mode="L")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def build_datasets(
    name: str, data_dir: str | None, train_transform: Transform, eval_transform: Transform, download: bool = False
) -> DatasetSplits:
    """Builds the training and validation splits of a dataset.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Root directory (unused by ``digits``).
        train_transform: Transform of training images (PIL → tensor).
        eval_transform: Transform of validation images.
        download: Let torchvision fetch CIFAR/Food-101 into ``data_dir`` when missing.

    Raises:
        DataError: Unknown name, or data missing or malformed.
    """
    name = canonical(name) or name
    if name == "digits":
        return DatasetSplits(DigitsDataset(True, train_transform), DigitsDataset(False, eval_transform), 10, 1)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not data_dir:
        raise DataError(f"--data-dir is required for {name}; expected layout: {LAYOUTS[name]}")
    if not download and not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir!r} does not exist; expected layout: {LAYOUTS[name]}")
    try:
        if name == "imagefolder":
            return _image_folders(data_dir, train_transform, eval_transform)
        return _torchvision_splits(name, data_dir, train_transform, eval_transform, download)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError) as error:
        # torchvision reports a missing or corrupt dataset with RuntimeError; unpickling a malformed
        # batch file raises the others. Any of them means "the directory is not what we expected".
        hint = " (or pass --download)" if name != "imagefolder" else ""
        raise DataError(
            f"cannot read {name} from {data_dir!r}: {first_line(error)}; expected {LAYOUTS[name]}{hint}"
        ) from None


@dataclass
class Loaders:
    """The data loaders and what the model must be built for."""

    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    num_classes: int
    in_chans: int
    img_size: int
    train_images: int
    val_images: int


def build_loaders(args: Namespace, runtime: Any) -> Loaders:
    """timm transforms at ``--img-size`` over train.py's dataset, sharded over DDP processes (``runtime``: its
    ``Runtime``: device, rank and world size).

    Each process loads ``--batch-size`` images per step (timm's convention), so the global batch is
    ``batch_size × world_size``. The training sampler is a DistributedSampler even in one process, so one
    process with batch 2B and two processes with batch B each see the same samples in every step: without
    random augmentation, drop-path or mixup the results are the same up to float rounding (with them, each
    process draws its own random numbers, so the runs are equivalent in distribution, not bit for bit).
    """
    cfg = timm.models.get_pretrained_cfg(args.model)
    img_size = args.img_size if args.img_size is not None else cfg.input_size[-1]
    in_chans = 1 if args.dataset == "digits" else 3
    mean, std = (cfg.mean[0],) * in_chans, (cfg.std[0],) * in_chans
    # Digits are not mirror-symmetric and only 8 pixels wide: no flips, mild crops.
    hflip = args.hflip if args.hflip is not None else (0.0 if args.dataset == "digits" else 0.5)
    scale = tuple(args.scale) if args.scale else ((0.8, 1.0) if args.dataset == "digits" else None)
    common = {"input_size": (in_chans, img_size, img_size), "interpolation": cfg.interpolation, "mean": mean}
    if args.aa:
        patch_timm_posterize()  # timm + Pillow >= 11 raise on 0 posterize bits mid-training otherwise
    try:
        train_tf = create_transform(
            **common, std=std, is_training=True, no_aug=args.no_aug, hflip=hflip, scale=scale,
            auto_augment=args.aa, re_prob=args.reprob, re_mode="pixel", color_jitter=0.0 if in_chans == 1 else 0.4,
            crop_pct=1.0,
        )  # fmt: skip
    except (AssertionError, ValueError, KeyError, IndexError) as error:  # timm asserts on an unknown policy
        where = f"--aa {args.aa!r}" if args.aa else "the training transform"
        raise UsageError(f"{where}: {first_line(error)} (e.g. rand-m9-mstd0.5-inc1, augmix, original)") from None
    eval_tf = create_transform(**common, std=std, is_training=False, crop_pct=cfg.crop_pct)
    splits = build_datasets(args.dataset, args.data_dir, train_tf, eval_tf, download=args.dataset_download)
    if args.num_classes is not None and args.num_classes != splits.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} does not match the {splits.num_classes} classes of "
                         f"{args.dataset} (omit --num-classes to use the dataset's)")  # fmt: skip
    per_process = args.batch_size
    sampler = DistributedSampler(splits.train, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    if len(sampler) < per_process:
        raise DataError(f"{len(splits.train)} training images give {len(sampler)} per process, fewer than one "
                        f"batch of {per_process} (--batch-size is per process)")  # fmt: skip
    loader_args = {"num_workers": args.workers, "pin_memory": runtime.device.type == "cuda"}
    train = DataLoader(splits.train, per_process, sampler=sampler, drop_last=True, **loader_args)
    # Evaluation shards without padding (DistributedSampler would repeat samples); counts are summed.
    val_shard = Subset(splits.val, range(runtime.rank, len(splits.val), runtime.world_size))
    val = DataLoader(val_shard, max(per_process, 64), shuffle=False, **loader_args)
    return Loaders(train, val, sampler, splits.num_classes, in_chans, img_size, len(splits.train), len(splits.val))


def _torchvision_splits(
    name: str, root: str, train_transform: Transform, eval_transform: Transform, download: bool
) -> DatasetSplits:
    from torchvision import datasets

    if name == "food101":
        train = datasets.Food101(root, split="train", transform=train_transform, download=download)
        val = datasets.Food101(root, split="test", transform=eval_transform, download=download)
        return DatasetSplits(NamedReadErrors(train), NamedReadErrors(val), len(train.classes), 3)
    dataset_cls = _presence_checked(datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)
    train = dataset_cls(root, train=True, transform=train_transform, download=download)
    val = dataset_cls(root, train=False, transform=eval_transform, download=download)
    return DatasetSplits(train, val, len(train.classes), 3)


def _presence_checked(dataset_cls: type) -> type:
    """The torchvision CIFAR class, accepting any directory in its format.

    torchvision compares MD5 sums against the official archive, so a re-packed or subset directory in
    the same pickled format (e.g. a test fixture) is reported as corrupt although it reads fine. Here
    the files must exist; unpickling them then catches malformed contents.
    """

    class PresenceChecked(dataset_cls):
        # check_integrity(path, None) only checks that the file exists; the download keeps its MD5.
        train_list: ClassVar[list] = [(name, None) for name, _ in dataset_cls.train_list]
        test_list: ClassVar[list] = [(name, None) for name, _ in dataset_cls.test_list]
        meta: ClassVar[dict] = {**dataset_cls.meta, "md5": None}

    PresenceChecked.__name__ = dataset_cls.__name__
    return PresenceChecked


def _image_folders(root: str, train_transform: Transform, eval_transform: Transform) -> DatasetSplits:
    from torchvision.datasets import ImageFolder

    splits = {}
    for split, transform in (("train", train_transform), ("val", eval_transform)):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DataError(f"missing {path!r}; expected layout: {LAYOUTS['imagefolder']}")
        # ImageFolder opens images lazily; convert to RGB so grayscale/CMYK files batch with the rest.
        splits[split] = ImageFolder(path, transform=transform, loader=_rgb_loader)
    if splits["train"].classes != splits["val"].classes:
        raise DataError(
            f"train and val class folders differ under {root!r} "
            f"({len(splits['train'].classes)} vs {len(splits['val'].classes)} classes)"
        )
    return DatasetSplits(splits["train"], splits["val"], len(splits["train"].classes), 3)


def _rgb_loader(path: str) -> Image.Image:
    """Opens and decodes one image as RGB; a damaged file raises :class:`DataError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except IMAGE_READ_ERRORS as error:
        raise DataError(corrupt_image_message(path, error)) from None


def corrupt_image_message(path: str, error: BaseException) -> str:
    """One line naming the unreadable image and what to do about it."""
    return (
        f"cannot read image {path}: {first_line(error)}; remove or replace the file and restart "
        "(--resume auto continues from the last checkpoint)"
    )


_TIMM_POSTERIZE: Callable[..., Image.Image] | None = None  # timm's own posterize, once patched


def _posterize_zero_bits_black(img: Image.Image, bits_to_keep: int, **kwargs: object) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the black image Pillow < 11 gave (every value masked away)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


def patch_timm_posterize() -> bool:
    """Lets timm's RandAugment/AutoAugment posterize keep 0 bits under a Pillow that refuses it.

    timm maps the top magnitude of "increasing" posterize (``inc1`` policies such as the recipes'
    ``rand-m9-mstd0.5-inc1``, whenever the sampled magnitude reaches 10) and low magnitudes of plain posterize to
    0 bits kept. Pillow up to 10 returned a black image for that; newer Pillow raises ``ValueError: bits must be
    between or equal to 1 and 8``, which stopped a training run at a random step. This restores the black image
    in timm's operator table (before the transforms are built; idempotent; nothing changes under a Pillow that
    accepts 0 bits).

    Returns:
        Whether timm's table was patched (now or earlier).
    """
    global _TIMM_POSTERIZE
    from PIL import ImageOps
    from timm.data import auto_augment

    if _TIMM_POSTERIZE is not None:
        return True
    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
        return False
    except ValueError:
        pass
    original = auto_augment.NAME_TO_OP.get("PosterizeIncreasing")
    if original is None:
        return False
    _TIMM_POSTERIZE = original
    for name, operation in auto_augment.NAME_TO_OP.items():
        if operation is original:
            auto_augment.NAME_TO_OP[name] = _posterize_zero_bits_black
    return True


class NamedReadErrors(Dataset):
    """Wraps a torchvision dataset that opens image files itself (Food-101), naming a damaged file.

    Args:
        dataset: A dataset with the list of its image paths in ``_image_files`` (torchvision's Food101).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[object, int]:
        try:
            return self.dataset[index]
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # not ValueError: transforms raise it
            path = str(self.dataset._image_files[index])
            raise DataError(corrupt_image_message(path, error)) from None
