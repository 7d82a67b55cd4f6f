"""Reference architectures used by tests, docs and benchmarks, registered in one place.

``build(name)`` returns ``(module, example_input)`` with the module in eval mode and its
BatchNorm statistics set to non-trivial values (a freshly built BN has mean 0, var 1, gamma 1,
beta 0, which would hide folding mistakes). ``build(name, bn=False)`` builds the same network
without BatchNorm (every BN replaced by Identity), the speed limit a fold can reach.

Each entry says which of its BNs are exactly foldable; the tests hold bnfold to that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bnfold.models import nets

__all__ = ["ModelSpec", "REGISTRY", "build", "names", "DEFAULT_MODEL"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered reference model.

    Attributes:
        factory: builds the module (random init).
        input_shape: shape of one example batch.
        description: one line for docs and ``bnfold models``.
        unfoldable: how many BNs cannot be folded exactly (0: every BN folds).
        heavy: too large for the default test run (benchmarks, slow tests).
    """

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    unfoldable: int = 0
    heavy: bool = False


REGISTRY: dict[str, ModelSpec] = {
    "resnet-mini": ModelSpec(
        nets.resnet_mini, (2, 3, 32, 32), "ResNet-style basic blocks with downsampling shortcuts"
    ),
    "resnet50": ModelSpec(
        nets.resnet50,
        (1, 3, 224, 224),
        "ResNet-50-sized bottleneck network (~25M parameters, ~100 MB fp32)",
        heavy=True,
    ),
    "mobilenet-mini": ModelSpec(
        nets.mobilenet_mini,
        (2, 3, 32, 32),
        "MobileNet-style: depthwise convs, and BN after the activation before a 1x1 conv",
    ),
    "bn-after-act": ModelSpec(
        nets.bn_after_activation,
        (2, 3, 16, 16),
        "Conv -> ReLU -> BN -> zero-padded 3x3 Conv: the BN cannot be folded exactly",
        unfoldable=1,
    ),
    "decoder": ModelSpec(
        nets.decoder, (2, 8, 8, 8), "ConvTranspose2d decoder, with a grouped transposed conv"
    ),
    "mlp": ModelSpec(nets.mlp, (4, 32), "MLP with Linear -> BatchNorm1d and BatchNorm1d -> Linear"),
    "flatten-head": ModelSpec(
        nets.flatten_head, (2, 3, 8, 8), "Conv -> ReLU -> BN -> Flatten -> Linear classifier"
    ),
    "conv1d": ModelSpec(nets.conv1d_net, (2, 4, 64), "Conv1d + BatchNorm1d audio-style net"),
    "conv3d": ModelSpec(nets.conv3d_net, (1, 2, 8, 16, 16), "Conv3d + BatchNorm3d video-style net"),
}

DEFAULT_MODEL = "resnet-mini"


def names(include_heavy: bool = True) -> list[str]:
    return [n for n, s in REGISTRY.items() if include_heavy or not s.heavy]


def build(
    name: str = DEFAULT_MODEL, *, seed: int = 0, bn: bool = True
) -> tuple[nn.Module, torch.Tensor]:
    """Build a registered model in eval mode with randomised BN statistics.

    Args:
        name: a key of :data:`REGISTRY`.
        seed: seeds weights, statistics and the example input.
        bn: False replaces every BatchNorm by Identity (the no-BN speed limit).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.factory()
    nets.randomise_batchnorm(model, gen)
    if not bn:
        nets.strip_batchnorm(model)
    model.eval()
    example = torch.randn(spec.input_shape, generator=gen)
    return model, example
