"""BN depth levels from the probe's graph walk against gradients, the definition they replace."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from bnfold.models import build, names
from bnfold.recalib import levels
from bnfold.recalib.torch_sites import discover_sites


def _by_gradients(calls: list[list[Any]], count: int) -> list[set[int]]:
    """Site ``i`` reaches site ``j`` when ``autograd.grad`` of ``j``'s input gives ``i``'s
    output a gradient (the probe's former rule: one backward per BN call)."""
    deps: list[set[int]] = [set() for _ in range(count)]
    for k, (j, x, _leaf) in enumerate(calls):
        earlier = [(i, leaf) for i, _x, leaf in calls[:k] if leaf is not None]
        if not earlier:
            continue
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            deps[j] |= {i for i, _ in earlier}
            continue
        grads = torch.autograd.grad(
            x,
            [leaf for _, leaf in earlier],
            grad_outputs=torch.ones_like(x),
            retain_graph=True,
            allow_unused=True,
        )
        deps[j] |= {i for (i, _), g in zip(earlier, grads, strict=True) if g is not None}
    return deps


def _compare(model: nn.Module, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    runner, sites, _ = discover_sites(model, "exact")
    seen: dict[str, Any] = {}
    walk = levels._dependencies

    def both(calls: list[list[Any]], count: int) -> list[set[int]]:
        seen["walk"] = walk(calls, count)
        seen["grad"] = _by_gradients(calls, count)
        return seen["walk"]

    monkeypatch.setattr(levels, "_dependencies", both)
    found, _ = levels._probe_levels(runner, sites, batch, None)
    assert seen["walk"] == seen["grad"]
    return found


class _Branches(nn.Module):
    """Two parallel BNs, a BN of their sum, a BN fed straight by a BN, a shared BN called on
    two depths, and a BN behind a no_grad cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.bn_sum, self.bn_next = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.shared = nn.BatchNorm2d(4)
        self.bn_cut = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.bn_a(self.a(x)), self.bn_b(self.b(x))
        s = self.bn_next(self.bn_sum(a + b))
        t = self.shared(self.shared(s) * 2)
        with torch.no_grad():
            u = t + 1
        return self.bn_cut(u) + a


def test_walk_finds_the_dependencies_gradients_find(monkeypatch):
    model = _Branches().eval()
    found = _compare(model, torch.randn(2, 3, 5, 5), monkeypatch)
    _, sites, _ = discover_sites(model, "exact")
    by_name = dict(zip([s.name for s in sites], found, strict=True))
    assert by_name == {
        "bn_a": 1,
        "bn_b": 1,
        "bn_sum": 2,
        "bn_next": 3,
        # shared is called at depth 4 and again at depth 5: one level per module, the
        # deepest its calls need (a cycle check keeps it from depending on itself)
        "shared": 4,
        # behind the cut every earlier BN is assumed upstream
        "bn_cut": 5,
    }


@pytest.mark.parametrize("name", names(include_heavy=False))
def test_walk_matches_gradients_on_the_reference_models(name, monkeypatch):
    model, example = build(name)
    _compare(model, example[:2] if example.dim() > 1 else example, monkeypatch)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "densenet121"])
def test_walk_matches_gradients_on_torchvision_models(arch, monkeypatch):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, arch)(num_classes=10).eval()
    found = _compare(model, torch.randn(2, 3, 32, 32), monkeypatch)
    assert max(found) > 10  # deep chains of BNs, not one level
