"""Datasets, transforms and loaders: timm's datasets and transforms, Fashion-MNIST offline.

Fashion-MNIST (and MNIST) are read from their IDX files, gzipped or not: from ``--data-dir``,
torchvision's ``<data-dir>/FashionMNIST/raw`` layout, or the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Nothing is downloaded.
Other ``torch/`` names and image-folder trees go through ``timm.data.create_dataset``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision import transforms as T

from .config import TrainConfig

__all__ = [
    "DataError",
    "DataSpec",
    "IdxDataset",
    "build_data",
    "eval_loader",
    "lane_seed",
    "read_idx",
    "train_loader",
]

SYSTEM_DIRS = {
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}
TORCHVISION_DIRS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Per-channel statistics of the training sets, for normalization.
STATS = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}
FOLDER_NAMES = ("", "folder")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(FileNotFoundError):
    """The dataset is missing or malformed; the message says how to get it."""


def missing_message(name: str, searched: Sequence[Path]) -> str:
    where = "\n".join(f"  {p}" for p in searched) or "  (nowhere: no --data-dir given)"
    files = ", ".join(f"{f}[.gz]" for pair in IDX_FILES.values() for f in pair)
    package = "dataset-fashion-mnist" if name == "fashion_mnist" else "dataset-mnist"
    return (
        f"{name} not found; looked for its IDX files in:\n{where}\n"
        f"Install it with `apt-get install -y {package}` (Debian/Ubuntu; the files land in "
        f"{SYSTEM_DIRS[name][0]}), or put the four files ({files}) in a folder and pass "
        "--data-dir FOLDER. Nothing is downloaded."
    )


# Fashion-MNIST and MNIST both have ten classes.
IDX_CLASSES = 10


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped when its name ends in ``.gz``."""
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path} cannot be read whole (truncated or corrupt?): {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is shorter than its IDX header ({ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes), file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


class IdxDataset(Dataset):
    """Images and labels from IDX arrays; items are ``(PIL image, int)`` like torchvision's."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                "IDX images must be (N, H, W) and labels (N,), "
                f"got {images.shape} and {labels.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def _find_idx(name: str, data_dir: str | None, split: str) -> tuple[Path, Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir)
        dirs += [root, root / TORCHVISION_DIRS[name] / "raw", root / name.replace("_", "-")]
    else:
        dirs += SYSTEM_DIRS[name]
    for d in dirs:
        found = []
        for stem in IDX_FILES[split]:
            hits = [d / f"{stem}{ext}" for ext in ("", ".gz") if (d / f"{stem}{ext}").is_file()]
            found.append(hits[0] if hits else None)
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    raise DataError(missing_message(name, dirs))


def _idx_dataset(name: str, data_dir: str | None, split: str) -> IdxDataset:
    images, labels = _find_idx(name, data_dir, split)
    ys = read_idx(labels)
    if not np.issubdtype(ys.dtype, np.integer):
        raise DataError(
            f"{labels} holds {ys.dtype} labels: IDX labels must be integers (a float label "
            "would be truncated to a class silently)"
        )
    bad = ys[(ys < 0) | (ys >= IDX_CLASSES)] if ys.size else ys
    if bad.size:
        raise DataError(
            f"{labels} holds label {int(bad[0])}, outside 0..{IDX_CLASSES - 1} "
            f"({bad.size} such labels)"
        )
    xs = read_idx(images)
    if xs.dtype != np.uint8:
        raise DataError(
            f"{images} holds {xs.dtype} images: IDX images must be unsigned bytes (0-255, as "
            "MNIST's); convert them to uint8"
        )
    return IdxDataset(xs, ys)


@dataclass
class DataSpec:
    """Both splits (items are ``(PIL image, label)``) and what the model needs to know."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]


def _canonical(dataset: str) -> str:
    name = dataset.strip()
    lowered = name.lower().replace("-", "_")
    if lowered in ("fashion_mnist", "torch/fashion_mnist", "torch/fashionmnist"):
        return "torch/fashion_mnist"
    if lowered in ("mnist", "torch/mnist"):
        return "torch/mnist"
    return "" if lowered in FOLDER_NAMES else name


def _folder(cfg: TrainConfig, mode: str) -> tuple[Dataset, Dataset, int]:
    if cfg.data_dir is None:
        raise DataError("--dataset folder needs --data-dir DIR with DIR/train/ and DIR/val/")
    root = Path(cfg.data_dir)
    if not (root / "train").is_dir():
        raise DataError(f"{root}/train/ not found: an image-folder dataset needs train/ and val/")
    val_dir = next((root / s for s in ("val", "validation", "valid") if (root / s).is_dir()), None)
    if val_dir is None:
        raise DataError(f"{root}/val/ not found: an image-folder dataset needs train/ and val/")
    try:
        train = create_dataset("", root=str(root), split="train", input_img_mode=mode)
        class_map = dict(train.reader.class_to_idx)
        extra = sorted(d.name for d in val_dir.iterdir() if d.is_dir() and d.name not in class_map)
        if extra:
            raise DataError(
                f"{val_dir}/ has classes that {root}/train/ does not: {extra[:5]}; both splits "
                "need the same class folders (a missing one in val/ is fine)"
            )
        # The training split's labels for both: a class missing from val/ must not shift
        # the indices of the others.
        val = create_dataset(
            "", root=str(root), split=val_dir.name, input_img_mode=mode, class_map=class_map
        )
    except DataError:
        raise
    except Exception as e:  # timm's readers raise several types for an empty or odd tree
        raise DataError(f"cannot read the image folders under {root}: {e}") from e
    classes = len(train.reader.class_to_idx)
    if len(train) == 0 or classes == 0:
        raise DataError(f"{root}/train/ holds no images in class folders")
    return train, val, classes


def _torchvision(cfg: TrainConfig, name: str) -> tuple[Dataset, Dataset, int]:
    root = cfg.data_dir or "data"
    try:
        train = create_dataset(name, root=root, split="train", download=cfg.dataset_download)
        val = create_dataset(name, root=root, split="validation", download=cfg.dataset_download)
    except (RuntimeError, AssertionError, FileNotFoundError) as e:
        hint = "" if cfg.dataset_download else " (nothing is downloaded unless --dataset-download)"
        raise DataError(f"{name}: cannot load it from {root}{hint}: {e}") from e
    classes = len(getattr(train, "classes", [])) or int(max(train.targets)) + 1
    return train, val, classes


def _choose(ds: Dataset, n: int | None) -> Dataset:
    """A fixed random subset of ``n`` items, the same whatever ``--seed`` (so runs compare)."""
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    return Subset(ds, sorted(order[:n].tolist()))


def _stats(values: Sequence[float], chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    if len(values) == 1:
        return values * chans
    # A model config for RGB used with fewer channels: their mean is the best single guess.
    return (sum(values) / len(values),) * chans


def build_data(cfg: TrainConfig, pretrained_cfg: dict[str, Any]) -> DataSpec:
    """Load both splits and resolve classes, channels, size and normalization.

    ``pretrained_cfg`` is the model's timm config (``input_size``, ``mean``, ``std``); the
    dataset's own statistics take precedence where it has them, flags over both.
    """
    name = _canonical(cfg.dataset)
    key = name.split("/", 1)[-1]
    if name in ("torch/fashion_mnist", "torch/mnist"):
        train, val = (
            _idx_dataset(key, cfg.data_dir, "train"),
            _idx_dataset(key, cfg.data_dir, "val"),
        )
        classes, chans, size = IDX_CLASSES, 1, int(train.images.shape[1])
        mean, std = STATS[key]
    elif name == "":
        chans = cfg.in_chans or 3
        train, val, classes = _folder(cfg, "L" if chans == 1 else "RGB")
        size = int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        mean, std = pretrained_cfg.get("mean", (0.5,)), pretrained_cfg.get("std", (0.5,))
    elif name.lower().startswith("torch/"):
        train, val, classes = _torchvision(cfg, name)
        sample = train[0][0]
        chans = 1 if getattr(sample, "mode", "RGB") == "L" else 3
        size = int(getattr(sample, "size", (32, 32))[0])
        mean, std = pretrained_cfg.get("mean", (0.5,)), pretrained_cfg.get("std", (0.5,))
    else:
        raise DataError(
            f"unknown --dataset {cfg.dataset!r}: use torch/fashion_mnist (default), torch/mnist, "
            "another timm torch/ name (torch/cifar10, torch/cifar100, ...) or folder"
        )
    chans = cfg.in_chans or chans
    mean = _stats(cfg.mean or mean, chans)
    std = _stats(cfg.std or std, chans)
    if cfg.num_classes is not None and cfg.num_classes < classes:
        raise DataError(f"--num-classes {cfg.num_classes} is below the dataset's {classes} classes")
    # timm's eval pipeline (resize, centre crop at crop_pct 1, to tensor, normalize); training
    # puts the paper's CIFAR augmentation (pad-4 random crop, horizontal flip) in front of it.
    native = size
    size = cfg.img_size or size
    evaluate = create_transform(
        (chans, size, size),
        is_training=False,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=mean,
        std=std,
    )
    convert = _Mode("L" if chans == 1 else "RGB")
    if cfg.no_aug:
        train_tf = T.Compose([convert, evaluate])
    else:
        # Folder images come in any size: bring them to the model's size before cropping.
        resize = [T.Resize(size), T.CenterCrop(size)] if name == "" or size != native else []
        augment = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
        train_tf = T.Compose([convert, *resize, *augment, evaluate])
    return DataSpec(
        train=_choose(train, cfg.train_subset),
        val=_choose(val, cfg.val_subset),
        num_classes=cfg.num_classes or classes,
        in_chans=chans,
        img_size=size,
        mean=mean,
        std=std,
        train_transform=train_tf,
        eval_transform=T.Compose([convert, evaluate]),
    )


class _Mode:
    """Convert a PIL image to ``L`` or ``RGB`` (what the model's ``in_chans`` asks for)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"Convert({self.mode!r})"


class _Transformed(Dataset):
    def __init__(self, ds: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.ds[index][:2]
        return self.transform(img), int(target)


def lane_seed(seed: int, lane: int, epoch: int) -> int:
    """The seed of a lane's data order (and worker seeds) in one epoch."""
    return int(
        np.random.SeedSequence([seed, lane, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def train_loader(spec: DataSpec, cfg: TrainConfig, lane: int, epoch: int) -> DataLoader:
    """Lane ``lane``'s shuffled batches for ``epoch``, a function of (seed, lane, epoch) only.

    The loader draws from its own generator, never the global one, so peers interleaved in one
    process keep independent orders and a resumed run replays the same batches. Incomplete
    last batches are dropped so that every lane takes the same number of steps (lockstep).
    """
    g = torch.Generator().manual_seed(lane_seed(cfg.seed, lane, epoch))
    ds = _Transformed(spec.train, spec.train_transform)
    if cfg.batch_size > len(ds):
        raise DataError(f"--batch-size {cfg.batch_size} exceeds the {len(ds)} training images")
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=RandomSampler(ds, generator=g),
        generator=g,
        drop_last=True,
        num_workers=cfg.workers,
        persistent_workers=False,
    )


def eval_loader(spec: DataSpec, cfg: TrainConfig) -> DataLoader:
    """The validation split in a fixed order."""
    ds = _Transformed(spec.val, spec.eval_transform)
    return DataLoader(ds, batch_size=2 * cfg.batch_size, shuffle=False, num_workers=cfg.workers)
