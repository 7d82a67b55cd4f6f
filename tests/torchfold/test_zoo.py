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
