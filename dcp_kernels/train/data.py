"""Datasets for ``dcp-train``: the embedded digits (default), CIFAR-10 and ImageFolder trees.

Every loader returns a :class:`DataSpec`: batches come from ``spec.train_batches(epoch)`` and
``spec.test_batches()``, so the training loop does not care where the images live.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataSpec:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int
    train_batches: Callable[[int], Iterator[Batch]]  # epoch -> batches (shuffled per epoch)
    test_batches: Callable[[], Iterator[Batch]]


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None,
                    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None):
    """Batches of in-memory tensors; ``seed`` shuffles (a new permutation per epoch)."""
    def batches(epoch: int = 0) -> Iterator[Batch]:
        g = torch.Generator().manual_seed((seed or 0) * 100003 + epoch)
        order = torch.randperm(len(y), generator=g) if seed is not None else torch.arange(len(y))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, g)
            yield xb, y[idx]
    return batches


def load_digits(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled with scikit-learn.

    Images are scaled to [0, 1], upsampled to ``image_size`` (bilinear) and standardised; the
    split is a fixed permutation given by ``seed``.

    Returns ``(x_train, y_train, x_test, y_test)`` as tensors, x of shape (N, 1, S, S).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a declared dependency
        raise ImportError("the embedded dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def digits_spec(batch_size: int, image_size: int = 32, seed: int = 0) -> DataSpec:
    x_train, y_train, x_test, y_test = load_digits(image_size, seed=seed)
    return DataSpec("digits", 10, 1, image_size, len(y_train), len(y_test),
                    _tensor_batches(x_train, y_train, batch_size, seed),
                    _tensor_batches(x_test, y_test, 256, None))


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _find_cifar10(root: Path) -> Path:
    for candidate in (root, root / "cifar-10-batches-py"):
        if all((candidate / f).is_file() for f in CIFAR10_FILES):
            return candidate
    missing = [f for f in CIFAR10_FILES if not (root / f).is_file()]
    raise FileNotFoundError(
        f"no CIFAR-10 data in {root}: expected the python-pickle batches (the 'cifar-10-batches-py' folder of "
        f"cifar-10-python.tar.gz) with files {', '.join(CIFAR10_FILES)}, either in {root} or in "
        f"{root / 'cifar-10-batches-py'}; missing in {root}: {', '.join(missing)}"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{path} is corrupt or not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); "
                         "extract it again from cifar-10-python.tar.gz") from exc
    try:
        data, labels = entry[b"data"], entry[b"labels"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (needs b'data' and b'labels')") from exc
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {len(labels)}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _crop_and_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation: pad 4, random 32x32 crop, random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=g)
    dy = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def cifar10_spec(root: str | os.PathLike, batch_size: int, seed: int = 0, augment: bool = True) -> DataSpec:
    """CIFAR-10 from its python-pickle batches in ``root``, normalised, with crop+flip augmentation."""
    folder = _find_cifar10(Path(root))
    parts = [_read_cifar_batch(folder / f) for f in CIFAR10_FILES]
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def tensors(chunks):
        x = torch.from_numpy(np.concatenate([c[0] for c in chunks])).float().div_(255)
        return (x - mean) / std, torch.from_numpy(np.concatenate([c[1] for c in chunks]))

    x_train, y_train = tensors(parts[:5])
    x_test, y_test = tensors(parts[5:])
    return DataSpec("cifar10", 10, 3, 32, len(y_train), len(y_test),
                    _tensor_batches(x_train, y_train, batch_size, seed, _crop_and_flip if augment else None),
                    _tensor_batches(x_test, y_test, 256, None))


def imagefolder_spec(root: str | os.PathLike, batch_size: int, seed: int = 0, image_size: int = 224,
                     workers: int = 4) -> DataSpec:
    """ImageNet-style ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (needs torchvision)."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir() or not any(p.is_dir() for p in (root / split).iterdir()):
            raise FileNotFoundError(
                f"no ImageFolder data in {root}: expected {root / split}/<class name>/<image files> "
                "(one folder per class, the same class folders in train/ and val/)"
            )
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise ImportError("ImageFolder data needs torchvision: pip install torchvision") from exc
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = datasets.ImageFolder(root / "train", transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize,
    ]))
    val = datasets.ImageFolder(root / "val", transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size), transforms.ToTensor(),
        normalize,
    ]))
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ and val/ hold different class folders")

    def train_batches(epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        return iter(torch.utils.data.DataLoader(train, batch_size, shuffle=True, generator=g, num_workers=workers,
                                                drop_last=False))

    def test_batches() -> Iterator[Batch]:
        return iter(torch.utils.data.DataLoader(val, 256, num_workers=workers))

    return DataSpec("imagefolder", len(train.classes), 3, image_size, len(train), len(val), train_batches,
                    test_batches)
