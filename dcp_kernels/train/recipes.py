"""Named training recipes: the paper's CIFAR-10 / ImageNet settings and the embedded default.

Hyperparameters from the paper (Shen et al., ICPR 2020; docs/algorithm.md): SGD, momentum 0.9,
weight decay 1e-4, lr 0.1 divided by 10 at the milestones, batch 64 on CIFAR-10; utility decay starts
at 0.6, +0.1 at each milestone, 1.0 from the last milestone on; 10 exploration epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    name: str
    data: str                    # "digits" | "cifar10" | "imagefolder"
    model: str                   # see dcp_kernels.train.zoo.build_model
    epochs: int
    milestones: tuple[int, ...]  # lr / 10 and decay + 0.1 at each; decay 1.0 from the last
    batch_size: int
    lr: float
    explore_epochs: int
    prune_ratio: float
    weight_decay: float = 1e-4
    momentum: float = 0.9
    decay: float = 0.6
    decay_step: float = 0.1
    note: str = ""
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "digits": Recipe("digits", "digits", "digits-vgg", epochs=10, milestones=(6, 9), batch_size=64, lr=0.05,
                     explore_epochs=2, prune_ratio=0.5,
                     note="embedded default: small VGG on scikit-learn's digits, about a minute on 2 CPU cores"),
    "cifar10-vgg16": Recipe("cifar10-vgg16", "cifar10", "vgg16", epochs=200, milestones=(100, 150, 190),
                            batch_size=64, lr=0.1, explore_epochs=10, prune_ratio=0.5,
                            note="paper: 93.50% top-1 at 73.3% FLOPs pruned (prune ratio not stated; 0.5 here)"),
    "cifar10-resnet32": Recipe("cifar10-resnet32", "cifar10", "resnet32", epochs=300,
                               milestones=(150, 200, 250, 290), batch_size=64, lr=0.1, explore_epochs=10,
                               prune_ratio=0.5,
                               note="paper: 92.60% top-1 at 50.2% FLOPs pruned (prune ratio not stated; 0.5 here)"),
    "imagenet-resnet50": Recipe("imagenet-resnet50", "imagefolder", "resnet50", epochs=90, milestones=(30, 60, 80),
                                batch_size=256, lr=0.1, explore_epochs=10, prune_ratio=0.3,
                                note="paper: 74.25% top-1 at 41.1% FLOPs pruned; epochs, milestones, batch and "
                                     "ratio here are the common ResNet-50 schedule, not taken from the paper"),
}
