"""Layers written the way zoos write them, and small nets built from them: Conv2d subclasses with their
own forward (timm's Conv2dSame and ScaledStdConv2d, transformers' BiT WeightStandardizedConv2d),
GroupNorm with an activation in its forward (timm's GroupNormAct) and ConvNeXt V2's GRN."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class SamePadConv2d(nn.Conv2d):
    """TensorFlow's 'SAME' padding, computed from the input's size at run time (as timm's Conv2dSame)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledWSConv2d(nn.Conv2d):
    """Scaled weight standardization with a per-filter gain (as timm's ScaledStdConv2d)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.empty(self.out_channels, 1, 1, 1).uniform_(0.5, 1.5))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = 1e-5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ZooConvNet(nn.Module):
    """Weight-standardized and SAME-padded convs (a depthwise one among them), BatchNorm after each,
    and a residual sum of two of them."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem, self.bn0 = ScaledWSConv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn1 = SamePadConv2d(16, 16, 3, stride=2, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn2 = ScaledWSConv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.down, self.bn3 = SamePadConv2d(24, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32)
        self.conv, self.bn4 = ScaledWSConv2d(32, 32, 3, padding=1, bias=True), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        x = F.relu(self.bn3(self.down(x)))
        x = F.relu(x + self.bn4(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupNormAct(nn.GroupNorm):
    """GroupNorm and an activation in one forward (as timm's GroupNormAct)."""

    def forward(self, x):
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt V2's GRN on NCHW tensors, written as timm writes it (its class name is how DCP knows
    it). Random affine parameters (zoos start them at zero, where the layer does nothing)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-0.5, 0.5))

    def forward(self, x):
        x_g = x.norm(p=2, dim=(2, 3), keepdim=True)
        x_n = x_g / (x_g.mean(dim=1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(1, -1, 1, 1), self.weight.view(1, -1, 1, 1), x * x_n)


class NormZooNet(nn.Module):
    """GroupNorms (a subclass with an activation, groups of 4 and 2 channels coupled by a residual sum,
    one channel per group) and a GRN, no BatchNorm."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem, self.gn0 = nn.Conv2d(3, 16, 3, padding=1), GroupNormAct(4, 16)
        self.conv1, self.gn1, self.grn = nn.Conv2d(16, 24, 3, padding=1), nn.GroupNorm(4, 24), GlobalResponseNorm(24)
        self.conv2, self.gn2 = nn.Conv2d(24, 16, 3, padding=1), nn.GroupNorm(8, 16)
        self.conv3, self.gn3 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(32, 32)
        self.fc = nn.Linear(32, classes)
        for gn in (self.gn0, self.gn1, self.gn2, self.gn3):
            nn.init.uniform_(gn.weight, 0.5, 1.5)
            nn.init.uniform_(gn.bias, -0.5, 0.5)

    def forward(self, x):
        x = self.gn0(self.stem(x))
        y = self.grn(F.relu(self.gn1(self.conv1(x))))
        x = F.relu(x + self.gn2(self.conv2(y)))
        x = F.relu(self.gn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
