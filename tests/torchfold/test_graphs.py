"""Inputs and guards beyond the Why list: GraphModule / ExportedProgram input, BN variants,
capture fallback, in-place semantics, and the parameter provenance in the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchfold_util import randomise, rel_err

import bnfold
from bnfold import BadInputError, SkipCode, UnsupportedModelError
from bnfold.torchfold import count_batchnorms, fold_torch


def _check_exact(model: nn.Module, x: torch.Tensor, **kw):
    ref = model(x)
    folded, report = fold_torch(model, x, **kw)
    assert rel_err(ref, folded(x)) <= 1e-5
    return folded, report


def test_graph_module_input_is_rewritten_and_copied() -> None:
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    folded, _report = fold_torch(gm, x)
    assert isinstance(folded, fx.GraphModule) and folded is not gm
    assert count_batchnorms(gm) == 1 and count_batchnorms(folded) == 0
    assert rel_err(gm(x), folded(x)) <= 1e-5
    same, _ = fold_torch(gm, x, inplace=True)
    assert same is gm and count_batchnorms(gm) == 0


def test_sync_batchnorm_and_subclass_in_eval_fold() -> None:
    class MyBN(nn.BatchNorm2d):
        """A subclass that keeps BatchNorm's forward."""

    model = randomise(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.Conv2d(4, 4, 1), MyBN(4))
    )
    folded, report = _check_exact(model, torch.randn(2, 3, 5, 5))
    assert len(report.folded) == 2 and count_batchnorms(folded) == 0


def test_subclass_overriding_forward_is_kept() -> None:
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), Scaled(4)))
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_torch(model, x)
    assert report.decisions[0].code is SkipCode.UNSUPPORTED
    assert torch.equal(model(x), folded(x))


def test_conv_subclass_with_own_forward_is_not_a_partner() -> None:
    class Standardised(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    model = randomise(nn.Sequential(Standardised(3, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_torch(model, x)
    assert report.decisions[0].code is SkipCode.NO_PARTNER
    assert torch.equal(model(x), folded(x))


def test_training_mode_and_missing_running_stats_are_reported() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).eval()
    model[3] = nn.BatchNorm2d(4, track_running_stats=False).eval()
    model[1].train()
    x = torch.randn(2, 3, 5, 5)
    _folded, report = fold_torch(model, x)
    assert [d.code for d in report.decisions] == [
        SkipCode.TRAINING_MODE,
        SkipCode.NO_RUNNING_STATS,
    ]


def test_bn_chain_collapses_into_one_conv_and_reports_provenance() -> None:
    model = randomise(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    )
    folded, report = _check_exact(model, torch.randn(2, 3, 6, 6))
    assert count_batchnorms(folded) == 0
    last = report.decisions[1]
    assert last.target == "0" and last.tensor == "_2"
    assert set(last.params["0.weight"]) == {
        "0.weight",
        "1.weight",
        "1.running_var",
        "2.weight",
        "2.running_var",
    }
    assert set(last.params["0.bias"]) == {
        f"{m}.{p}" for m in (1, 2) for p in ("weight", "bias", "running_mean", "running_var")
    }
    assert folded[0].bias is not None and list(folded._modules) == ["0"]


def test_original_untouched_unless_inplace() -> None:
    model = randomise(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)))
    x = torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, _ = fold_torch(model, x)
    assert folded is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = model(x)
    same, _ = fold_torch(model, x, inplace=True)
    assert same is model and list(model._modules) == ["0"]
    assert rel_err(ref, model(x)) <= 1e-5


def test_untraceable_module_falls_back_to_export() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.shape[-1] > 4:  # symbolic tracing cannot branch on a Proxy
                x = x * 2
            return self.bn(self.conv(x))

    model = randomise(Branchy())
    x = torch.randn(2, 3, 6, 6)
    folded, _report = _check_exact(model, x)
    # every fold joined two modules, so the export graph's folds come back as module surgery
    assert type(folded) is Branchy and count_batchnorms(folded) == 0
    # without example inputs only torch.fx can capture parts: the BN is kept, saying why
    _same, report = fold_torch(model)
    (d,) = report.decisions
    assert not d.folded and "example_inputs" in (d.reason or "")


def test_bad_inputs_are_one_line_errors() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    with pytest.raises(BadInputError, match="direction"):
        fold_torch(model, direction="sideways")
    with pytest.raises(BadInputError, match="do not run"):
        fold_torch(model, torch.randn(3, 7))
    with pytest.raises(BadInputError, match="cannot fold a"):
        fold_torch(42)
    scripted = torch.jit.script(model)
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        fold_torch(scripted)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_direction_restricts_and_says_so(direction: str) -> None:
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    x = torch.randn(1, 3, 4, 4)
    _folded, report = _check_exact(model, x, direction=direction)
    assert report.decisions[0].direction.value == direction
    relu_first = randomise(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    _, report = fold_torch(relu_first, torch.randn(1, 4, 4, 4), direction="backward")
    assert report.decisions[0].code is SkipCode.DIRECTION_DISABLED


def test_public_fold_dispatches_to_torch() -> None:
    model = randomise(nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)))
    x = torch.randn(2, 2, 9)
    folded, report = bnfold.fold(model, x)
    assert report.framework == "torch" and report.decisions[0].folded
    assert rel_err(model(x), folded(x)) <= 1e-5


def test_unbatched_conv1d_then_bn1d_is_an_axis_mismatch() -> None:
    model = randomise(nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(5)))
    x = torch.randn(4, 5)  # unbatched (C, L): conv channels on axis 0, BN normalises L
    folded, report = fold_torch(model, x)
    assert report.decisions[0].code is SkipCode.CHANNEL_AXIS
    assert torch.equal(model(x), folded(x))


def test_decomposed_exported_program_folds_native_batch_norm() -> None:
    from bnfold.models import build

    model, x = build("resnet-mini")
    program = torch.export.export(model, (x,)).run_decompositions()
    ops = {str(n.target) for n in program.graph.nodes}
    assert "aten._native_batch_norm_legit_no_training.default" in ops
    folded, report = fold_torch(program)
    assert count_batchnorms(folded) == 0 and not report.skipped
    assert rel_err(model(x), folded.module()(x)) <= 1e-5


def test_functional_layers_without_bias_get_one() -> None:
    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
            self.bn = nn.BatchNorm2d(6)
            self.w2 = nn.Parameter(torch.randn(5, 6 * 4 * 4))
            self.bn2 = nn.BatchNorm2d(6)

        def forward(self, x):
            y = torch.relu(self.bn(F.conv2d(x, self.w)))
            return F.linear(torch.flatten(self.bn2(y), 1), self.w2)

    model = randomise(Fn())
    x = torch.randn(2, 3, 6, 6)
    folded, report = _check_exact(model, x)
    assert isinstance(folded, fx.GraphModule) and count_batchnorms(folded) == 0
    back, fwd = report.decisions
    assert back.direction.value == "backward" and fwd.direction.value == "forward"
    new_names = set(back.params) | set(fwd.params)
    assert new_names == {"w", "w_bias", "w2", "w2_bias"} == set(folded.state_dict())
    assert "w2" in fwd.params["w2_bias"]  # the shift reaches the bias through the weight


def test_folded_bns_leave_no_identity_call_and_keep_the_other_keys() -> None:
    """A BN folded out of a plain nn.Sequential is deleted from it (no Identity call left);
    a BN held as an attribute, or in a Sequential subclass with its own forward, becomes an
    Identity. Either way the remaining state_dict keys are the original's."""

    class Custom(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x) * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.custom = Custom(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.custom(self.bn(self.conv(self.seq(x))))

    model = randomise(Net())
    folded, report = _check_exact(model, torch.randn(2, 3, 8, 8))
    assert all(d.folded for d in report.decisions)
    assert list(folded.seq._modules) == ["0", "2"]
    assert type(folded.bn) is nn.Identity and type(folded.custom[1]) is nn.Identity
    kept = {k for k in model.state_dict() if not k.startswith(("seq.1.", "bn.", "custom.1."))}
    assert set(folded.state_dict()) == kept | {"seq.0.bias", "conv.bias", "custom.0.bias"}
    assert sum(type(m) is nn.Identity for m in folded.modules()) == 2
