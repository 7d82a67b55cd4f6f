"""Randomised differential tests: random networks folded in every direction stay exact.

For each seed, :func:`randnet.build_random` makes a small network; folding it must leave the
original untouched, give every BN application one decision, remove every folded BN, keep
the outputs (fp32: relative error <= 1e-5; float64: <= 1e-12) and explain every skip with a
code. The default run covers 100 seeds; ``-m slow`` covers many more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from randnet import RandomNet, bn_applications, build_random
from torch import fx, nn
from torchfold_util import rel_err

import bnfold
from bnfold.torchfold.ops import as_batchnorm

DIRECTIONS = ("backward", "forward", "both")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_left(result: object) -> int:
    """BNs left in a folded result: BN ops of a graph, or BN modules the plan still calls."""
    if isinstance(result, fx.GraphModule):
        return len({n.target if n.op == "call_module" else n.name for n in _bn_nodes(result)})
    assert isinstance(result, RandomNet)
    return bn_applications(result)


def _bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if as_batchnorm(n, gm) is not None]


def check_seed(seed: int, dtype: torch.dtype) -> tuple[int, int]:
    """Fold seed's network every way and check the contract; returns (BNs, folded) of "both"."""
    model, x = build_random(seed, dtype)
    with torch.no_grad():
        ref = model(x.clone())
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
    after_ref = _state(model)  # a train-mode BN updates its statistics when run
    n_bn = bn_applications(model)
    stats = (0, 0)
    for direction in DIRECTIONS:
        folded, report = bnfold.fold(model, x, direction=direction)
        state = _state(model)
        assert state.keys() == after_ref.keys()
        for k, v in after_ref.items():
            assert torch.equal(state[k], v), f"seed {seed}: fold changed the original's {k}"
        assert len(report.decisions) == n_bn, f"seed {seed}: {report.decisions}"
        assert _bn_left(folded) == n_bn - len(report.folded), f"seed {seed} {direction}"
        for d in report.decisions:
            if d.folded:
                assert direction == "both" or d.direction.value == direction
            else:
                assert d.code is not None and d.reason, f"seed {seed}: {d}"
        with torch.no_grad():
            out = folded(x.clone())
        assert len(out) == len(ref)
        for r, o, r64 in zip(ref, out, ref64, strict=True):
            assert o.dtype == r.dtype
            err = rel_err(r, o)
            # A batch-statistics BN can amplify rounding; then the folded model must be as
            # close to the float64 reference as the original is.
            floor = 4 * rel_err(r64, r) if dtype != torch.float64 else 0.0
            assert err <= TOLERANCE[dtype] or rel_err(r64, o) <= max(TOLERANCE[dtype], floor), (
                f"seed {seed} {direction}: rel err {err:.3g}"
            )
        if direction == "both":
            stats = (n_bn, len(report.folded))
    return stats


def check_program(seed: int, decompose: bool) -> bool:
    """Fold seed's network as an ExportedProgram (optionally decomposed to core aten).

    Returns False when torch.export itself cannot capture the network (a train-mode BN with
    ``momentum=None`` reads its batch counter as a Python number), True once checked.
    """
    model, x = build_random(seed)
    try:
        program = torch.export.export(model, (x,))
    except Exception:
        return False
    if decompose:
        program = program.run_decompositions()
    gm = program.module()
    n_bn = len(_bn_nodes(gm))
    with torch.no_grad():
        ref = gm(x.clone())
        # the same network in float64, for the rounding floor of the unfolded model
        ref64 = copy.deepcopy(model).double()(x.double())
    for direction in DIRECTIONS:
        folded, report = bnfold.fold(program, direction=direction)
        assert isinstance(folded, torch.export.ExportedProgram)
        assert len(report.decisions) == n_bn
        assert len(_bn_nodes(folded.module())) == n_bn - len(report.folded)
        assert all(d.folded or d.code is not None for d in report.decisions)
        with torch.no_grad():
            out = folded.module()(x.clone())
        for r, o, r64 in zip(ref, out, ref64, strict=True):
            err = rel_err(r, o)
            # as in check_seed: where the network amplifies rounding (how much depends on the
            # CPU's kernels), the folded program must be as close to float64 as the original
            floor = 4 * rel_err(r64, r)
            assert err <= TOLERANCE[torch.float32] or rel_err(r64, o) <= max(
                TOLERANCE[torch.float32], floor
            ), f"seed {seed} {direction}: rel err {err:.3g}"
    return True


@pytest.mark.parametrize("decompose", [False, True])
def test_random_exported_programs(decompose: bool) -> None:
    checked = [check_program(seed, decompose) for seed in range(200, 206)]
    assert sum(checked) >= 4


@pytest.mark.parametrize("seed", range(100))
def test_random_network_fp32(seed: int) -> None:
    check_seed(seed, torch.float32)


@pytest.mark.parametrize("seed", range(0, 100, 4))
def test_random_network_float64(seed: int) -> None:
    check_seed(seed, torch.float64)


def test_random_networks_mostly_fold() -> None:
    """The generator is not vacuous: across seeds, most BNs are folded and some are kept."""
    totals = [check_seed(seed, torch.float32) for seed in range(1000, 1015)]
    n_bn = sum(t[0] for t in totals)
    n_folded = sum(t[1] for t in totals)
    assert n_bn > 30
    assert 0.4 * n_bn < n_folded < n_bn


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
def test_random_networks_many_seeds(block: int) -> None:
    for seed in range(10_000 + block * 200, 10_000 + (block + 1) * 200):
        check_seed(seed, torch.float32)
        if seed % 5 == 0:
            check_seed(seed, torch.float64)


@pytest.mark.slow
def test_random_exported_programs_many_seeds() -> None:
    checked = [check_program(seed, seed % 2 == 0) for seed in range(300, 400)]
    assert sum(checked) >= 80


@pytest.mark.slow
def test_random_networks_quick() -> None:
    for seed in range(5000, 5150):
        check_seed(seed, torch.float64 if seed % 2 else torch.float32)
