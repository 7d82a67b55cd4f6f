"""Every reference model folds with no foldable BN left, and computes what it computed."""

from __future__ import annotations

import pytest
import torch
from torchfold_util import rel_err

from bnfold.models import REGISTRY, build, names
from bnfold.torchfold import count_batchnorms, fold_torch

LIGHT = names(include_heavy=False)


@pytest.mark.parametrize("name", LIGHT)
def test_zoo_folds_every_foldable_bn_fp32(name: str) -> None:
    model, x = build(name)
    ref = model(x)
    folded, report = fold_torch(model, x)
    spec = REGISTRY[name]
    assert len(report.skipped) == spec.unfoldable, [d.reason for d in report.skipped]
    assert count_batchnorms(folded) == spec.unfoldable
    assert rel_err(ref, folded(x)) <= 1e-5
    assert torch.equal(model(x), ref), "the original model must be untouched"


@pytest.mark.parametrize("name", LIGHT)
def test_zoo_float64_matches_to_1e12(name: str) -> None:
    model, x = build(name)
    model, x = model.double(), x.double()
    folded, _report = fold_torch(model, x)
    assert count_batchnorms(folded) == REGISTRY[name].unfoldable
    assert rel_err(model(x), folded(x)) <= 1e-12


@pytest.mark.parametrize("name", LIGHT)
def test_zoo_exported_program_folds_the_aten_ops(name: str) -> None:
    model, x = build(name)
    program = torch.export.export(model, (x,))
    folded, report = fold_torch(program)
    assert isinstance(folded, torch.export.ExportedProgram)
    assert count_batchnorms(folded) == REGISTRY[name].unfoldable
    assert rel_err(model(x), folded.module()(x)) <= 1e-5
    # state_dict names of the program survive the round trip
    for d in report.folded:
        assert set(d.params) <= set(folded.state_dict)


@pytest.mark.slow
def test_zoo_resnet50_fp32_and_float64() -> None:
    model, x = build("resnet50")
    folded, _ = fold_torch(model, x)
    assert count_batchnorms(folded) == 0
    assert rel_err(model(x), folded(x)) <= 1e-5
    model64, x64 = model.double(), x.double()
    folded64, _ = fold_torch(model64, x64)
    assert rel_err(model64(x64), folded64(x64)) <= 1e-12


@pytest.mark.slow
def test_quick_zoo_exported_program_roundtrip_through_file(tmp_path) -> None:
    from bnfold.torchfold import fold_file

    report = fold_file("decoder", tmp_path / "decoder.pt2")
    program = torch.export.load(str(tmp_path / "decoder.pt2"))
    model, x = build("decoder")
    assert count_batchnorms(program) == 0 and len(report.folded) == 2
    assert rel_err(model(x), program.module()(x)) <= 1e-5


def _calls(model: torch.nn.Module) -> list[tuple[str, str]]:
    """What a forward executes, as (op, module class or function) per fx node."""
    gm = torch.fx.symbolic_trace(model)
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append((n.op, type(gm.get_submodule(str(n.target))).__name__))
        elif n.op in ("call_function", "call_method"):
            out.append((n.op, getattr(n.target, "__name__", str(n.target))))
    return out


def _layers_with_bias(model: torch.nn.Module) -> dict[str, bool]:
    return {
        k: m.bias is not None
        for k, m in model.named_modules()
        if isinstance(m, torch.nn.modules.conv._ConvNd | torch.nn.Linear)
    }


def _torchvision_resnet18() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    from bnfold.models import nets

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    nets.randomise_batchnorm(model, torch.Generator().manual_seed(0))
    model.eval()
    limit = torchvision.models.resnet18(weights=None).eval()
    nets.strip_batchnorm(limit)
    return model, limit, torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize(
    "name", [n for n in LIGHT if REGISTRY[n].unfoldable == 0] + ["torchvision:resnet18"]
)
def test_folded_model_runs_what_the_bn_free_network_runs(name: str) -> None:
    """The folded model makes exactly the calls of the same network built without BN: no
    Identity call, no multiply/add left beside a layer; the only difference is the bias
    each fold writes (the BN's shift) into a layer built without one. This is what makes its
    latency that of the BN-free network (bench/run.py measures it; eager timings on a shared
    machine move by a few percent, this does not)."""
    if name == "torchvision:resnet18":
        model, limit, x = _torchvision_resnet18()
    else:
        model, x = build(name)
        limit, _ = build(name, bn=False)
    folded, report = fold_torch(model, x)
    assert report.skipped == []
    assert type(folded) is type(model)
    assert _calls(folded) == _calls(limit)
    biased, plain = _layers_with_bias(folded), _layers_with_bias(limit)
    assert biased.keys() == plain.keys()
    assert all(biased[k] for k in plain if plain[k])  # no layer lost its bias
    gained = {k for k in biased if biased[k] and not plain[k]}
    assert gained == {d.target for d in report.folded} - {k for k in plain if plain[k]}
