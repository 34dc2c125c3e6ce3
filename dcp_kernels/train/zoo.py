"""What ``dcp-train`` trains and measures: the recipes' models and data, test accuracy, conv FLOPs,
and step times of several models side by side."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from dcp_kernels.models import resnet_cifar, vgg
from dcp_kernels.train.data import DataSpec, cifar10_spec, digits_spec, imagefolder_spec
from dcp_kernels.train.errors import UsageError
from dcp_kernels.train.recipes import Recipe

DIGITS_VGG = [32, 32, "M", 64, 64, "M", 128, 128]


def load_data(recipe: Recipe, args: argparse.Namespace, batch_size: int) -> DataSpec:
    if recipe.data == "digits":
        return digits_spec(batch_size, args.image_size, seed=args.seed)
    if recipe.data == "cifar10":
        return cifar10_spec(args.data, batch_size, seed=args.seed)
    return imagefolder_spec(args.data, batch_size, seed=args.seed, workers=args.workers)


def build_model(name: str, spec: DataSpec) -> nn.Module:
    if name == "digits-vgg":
        return vgg(DIGITS_VGG, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if name == "vgg16":
        return vgg("vgg16", num_classes=spec.num_classes, in_channels=spec.in_channels)
    if name == "resnet32":
        return resnet_cifar(32, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if name == "resnet50":
        try:
            import torchvision
        except ImportError as exc:
            raise UsageError("the resnet50 recipe needs torchvision") from exc
        return torchvision.models.resnet50(num_classes=spec.num_classes)
    raise ValueError(f"unknown model {name!r}")


def conv_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one sample shaped like ``x[0]``."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.shape[1] * output.shape[2] * output.shape[3] * module.in_channels // module.groups * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def accuracy(model: nn.Module, spec: DataSpec, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in spec.test_batches():
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    return correct / seen


def compare_step_times(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, SGD step) per model on (x, y).

    The models take turns step by step, so a noisy machine slows them all alike and the ratios
    stay meaningful. Two warm-up rounds are not counted.
    """
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i in range(steps + 2):
        for name, model in models.items():
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}
