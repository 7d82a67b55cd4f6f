"""The reference networks themselves (plain torch.nn, no bnfold imports)."""

from __future__ import annotations

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BN non-trivial statistics and affine parameters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.2)


def strip_batchnorm(model: nn.Module) -> None:
    """Remove every BN submodule, in place: deleted from a plain ``nn.Sequential`` (the
    network built without it), replaced by ``nn.Identity`` where a forward calls it by name."""
    for name, child in list(model.named_children()):
        if isinstance(child, _BN):
            if type(model).forward is nn.Sequential.forward:
                del model._modules[name]
            else:
                setattr(model, name, nn.Identity())
        else:
            strip_batchnorm(child)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout))
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            conv_bn(cin, width, 1),
            nn.ReLU(),
            conv_bn(width, width, 3, stride),
            nn.ReLU(),
            conv_bn(width, cout, 1),
        )
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], widths: list[int], classes: int) -> None:
        super().__init__()
        stem = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(
                3,
                stem,
                7 if block is Bottleneck else 3,
                2 if block is Bottleneck else 1,
                3 if block is Bottleneck else 1,
                bias=False,
            ),
            nn.BatchNorm2d(stem),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        cin = stem
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            for j in range(n):
                stride = 2 if j == 0 and i > 0 else 1
                blocks.append(block(cin, w, stride))
                cin = w * getattr(block, "expansion", 1)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet_mini() -> nn.Module:
    return ResNet(BasicBlock, [1, 1, 1], [8, 16, 32], classes=10)


def resnet50() -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], classes=1000)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> ReLU -> BN -> project 1x1 (BN after the activation)."""

    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.ReLU6())
        self.post_act_bn = nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.post_act_bn(self.dw(self.expand(x))))


def mobilenet_mini() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 8, 3, 2),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        InvertedResidual(8, 4),
        InvertedResidual(8, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def bn_after_activation() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1),  # zero padding: the border would see the BN shift
    )


def decoder() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(8, 8, 4, 2, 1, bias=False),  # C_in == C_out: axis mix-ups show
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 12, 3, 1, 1, groups=4),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 3, 1),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.BatchNorm1d(64),
        nn.Linear(64, 16),
        nn.BatchNorm1d(16, affine=False),
    )


def flatten_head() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1, groups=4),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def conv3d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.BatchNorm3d(8),
        nn.ReLU(),
    )
