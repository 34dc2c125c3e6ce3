"""Datasets for ``dcp-train``. The default ships inside an installed package: no downloads."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits(image_size: int = 16, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled with scikit-learn.

    Images are scaled to [0, 1], upsampled to ``image_size`` (bilinear) and standardised; the
    split is a fixed stratification-free permutation given by ``seed``.

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
