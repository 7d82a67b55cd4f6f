"""Population mode over the captured graph ("frontier") gives the bits of the per-level passes."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BadInputError, RecalibrationError
from bnfold.models import build, names


def _data(shape: tuple[int, ...], batches: int = 3, bs: int = 5, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, *shape, generator=g) * 2 + 0.5 for _ in range(batches)]


def _stats(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "tracked" in k}


def _both(model: nn.Module, data, **kw):
    """Recalibrate copies with the per-level passes and with the default; return both."""
    ref, new = copy.deepcopy(model), copy.deepcopy(model)
    r_ref = bnfold.recalibrate(ref, data, strategy="per-level", progress=False, **kw)
    r_new = bnfold.recalibrate(new, data, progress=False, **kw)
    assert r_ref.strategy == "per-level"
    want, got = _stats(ref), _stats(new)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert [b.level for b in r_new.bns] == [b.level for b in r_ref.bns]
    assert [b.samples for b in r_new.bns] == [b.samples for b in r_ref.bns]
    return r_ref, r_new


@pytest.mark.parametrize("name", names(include_heavy=False))
def test_reference_models_are_bit_identical_to_per_level_passes(name):
    model, example = build(name)
    shape = tuple(example.shape[1:])
    if name == "resnet-mini":
        shape = (3, 16, 16)  # seven levels: keep the per-level reference cheap
    _r, r = _both(model, _data(shape))
    assert r.strategy == "frontier", r.strategy_note


class _SharedAcrossLevels(nn.Module):
    """One BN module called at two sites of different depth, with a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        h = torch.relu(self.bn2(a))
        b = self.bn(self.conv2(h))  # shared BN, second level
        c = self.bn(a * 0.5 + 1.0)  # shared BN again, input from the first level
        return self.conv3(b + c + a)


class _LoopOfBlocks(nn.Module):
    """BNs created and called in a Python loop (unrolled by tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = torch.relu(bn(conv(x))) + x
        return x


class _OneBNInALoop(nn.Module):
    """The same BN module applied three times in a chain: it reads its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.relu(self.bn(self.conv(x)))
        return x


class _DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, _ = build("resnet-mini")

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.inner(image * scale)


def test_shared_bn_at_two_depths():
    torch.manual_seed(0)
    _r, r = _both(_SharedAcrossLevels().eval(), _data((3, 6, 6)))
    assert r.strategy == "frontier"


def test_bns_in_a_loop_and_one_bn_reused_in_a_loop():
    torch.manual_seed(0)
    _r, r = _both(_LoopOfBlocks().eval(), _data((3, 6, 6)))
    assert r.strategy == "frontier" and r.passes == 3
    # a BN reading its own output within one pass cannot be cut there: per-level passes
    _r, r = _both(_OneBNInALoop().eval(), _data((3, 6, 6)))
    assert r.strategy == "per-level" and "own level" in r.strategy_note


def test_dict_input_model():
    torch.manual_seed(0)
    data = [{"image": x, "scale": 0.5} for x in _data((3, 16, 16))]
    _r, r = _both(_DictInput().eval(), data)
    assert r.strategy == "frontier"


class _InPlaceThroughPassThrough(nn.Module):
    """timm's pattern: BN -> Identity (``drop_block``) -> ReLU(inplace), and BN -> Dropout
    (eval) -> ``relu_``: the in-place ops write a BN's output under another name.

    ``skip`` also adds the first BN's output (edited in place) to the last BN's input, a
    level later, which the plan does not reproduce across a segment cut: it falls back.
    """

    def __init__(self, skip: bool = False) -> None:
        super().__init__()
        self.skip = skip
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop_block, self.act = nn.Identity(), nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.drop = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_block(self.bn1(self.conv1(x)))
        z = self.act(y)
        w = self.conv3(self.drop(self.bn2(self.conv2(z))).relu_())
        return self.bn3(w + y if self.skip else w)


def test_in_place_ops_through_identity_and_dropout_use_the_frontier():
    torch.manual_seed(0)
    _r, r = _both(_InPlaceThroughPassThrough().eval(), _data((3, 6, 6)))
    assert r.strategy == "frontier", r.strategy_note


def test_in_place_edit_read_by_a_later_segment_falls_back_with_the_same_bits():
    torch.manual_seed(0)
    _r, r = _both(_InPlaceThroughPassThrough(skip=True).eval(), _data((3, 6, 6)))
    assert r.strategy == "per-level"
    assert "in-place op act writes a value other segments may read" in r.strategy_note


class _EditsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop_block, self.conv, self.bn = nn.Identity(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.drop_block(x).relu_()))


def test_in_place_edit_of_the_input_through_identity_falls_back():
    torch.manual_seed(0)
    _r, r = _both(_EditsItsInput().eval(), _data((3, 4, 4)))
    assert r.strategy == "per-level" and "in-place" in r.strategy_note


@pytest.mark.parametrize("arch", ["resnet18", "repvgg_a0", "tf_mobilenetv3_small_100"])
def test_timm_models_use_the_frontier(arch):
    """timm's ResNet blocks run ``act2`` in place on ``drop_block``'s output (an Identity),
    RepVGG its activation on ``attn``'s; the ``tf_*`` models pad "same" from the input size,
    which traces only with timm's not-traceable registry. All are cut into segments, with
    the same bits."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    _r, r = _both(model, _data((3, 32, 32), batches=2, bs=3))
    assert r.strategy == "frontier", r.strategy_note


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv(x))
        if y.sum() > -1e30:
            y = y * 2
        return self.bn2(self.conv(y))


def test_untraceable_model_falls_back_to_per_level_passes():
    torch.manual_seed(0)
    _r, r = _both(_Branchy().eval(), _data((3, 4, 4)))
    assert r.strategy == "per-level" and "torch.fx" in r.strategy_note


def test_tiny_budget_spills_then_recomputes_with_the_same_bits(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, _ = build("resnet-mini")
    data = _data((3, 16, 16), batches=3, bs=4)
    ref = copy.deepcopy(model)
    bnfold.recalibrate(ref, data, strategy="per-level", progress=False)

    def run(**kw):
        m = copy.deepcopy(model)
        r = bnfold.recalibrate(m, data, progress=False, **kw)
        assert r.strategy == "frontier"
        for k, v in _stats(ref).items():
            assert torch.equal(_stats(m)[k], v), k
        return r

    # no memory: everything spills to unlinked memory-mapped files
    spilled = run(data_cache_mb=0)
    assert spilled.peak_memory_mb == 0 and spilled.peak_spill_mb > 0
    assert "spilled" in spilled.strategy_note
    # room for part of the frontiers only: the others are recomputed
    budget = spilled.peak_spill_mb / 2
    mixed = run(data_cache_mb=budget, spill_mb=0)
    assert mixed.recomputed_segments > 0 and 0 < mixed.peak_memory_mb <= budget
    # nothing at all: every pass starts from the data again
    none = run(data_cache_mb=0, spill_mb=0)
    assert none.peak_memory_mb == 0 and none.recomputed_segments > mixed.recomputed_segments
    assert list(tmp_path.iterdir()) == []


def test_spill_files_are_gone_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, _ = build("resnet-mini")
    data = _data((3, 16, 16), batches=3, bs=4)
    data[2][0, 0, 0, 0] = float("nan")
    before = _stats(model)
    with pytest.raises(RecalibrationError, match="NaN"):
        bnfold.recalibrate(model, data, data_cache_mb=0, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(v, before[k]) for k, v in _stats(model).items())


def test_progress_prints_a_plain_line_per_pass_off_a_terminal(capsys):
    model, example = build("mlp")
    r = bnfold.recalibrate(model, _data(tuple(example.shape[1:]), batches=2), progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "recalibrating (pass" in line]
    assert len(lines) == r.passes and all("2 batch(es)" in line for line in lines)


def test_forward_fn_and_exported_program_use_the_frontier():
    model, _ = build("conv1d")
    data = [torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _r, r = _both(model, [{"pix": x} for x in data], forward_fn=lambda m, b: m(b["pix"]))
    assert r.strategy == "frontier"
    # a forward_fn that reaches into the model cannot be replayed on the graph
    _r, r = _both(model, data, forward_fn=lambda m, b: m.forward(b))
    assert r.strategy == "per-level" and "bind" in r.strategy_note
    ep = torch.export.export(model, (data[0],))
    r_ep = bnfold.recalibrate(ep, data, progress=False)
    r_pl = bnfold.recalibrate(torch.export.export(model, (data[0],)), data, strategy="per-level")
    assert r_ep.strategy == "frontier", r_ep.strategy_note
    for k, v in _stats(r_pl.model).items():
        assert torch.equal(_stats(r_ep.model)[k], v), k


def test_program_exported_for_a_fixed_batch_refuses_another_batch_size():
    model, _ = build("conv1d")
    ep = torch.export.export(model, (torch.randn(2, 4, 64),))  # static batch dimension 2
    with pytest.raises(BadInputError, match=r"refuses the batch: .*== 2"):
        bnfold.recalibrate(ep, [torch.randn(5, 4, 64)], progress=False)
    r = bnfold.recalibrate(ep, [torch.randn(2, 4, 64)] * 2, progress=False)
    assert r.strategy == "frontier"


def test_hooks_are_honoured():
    torch.manual_seed(0)
    net = _LoopOfBlocks().eval()
    # a pre-hook on the model edits the input; the graph run must see the edit
    net.register_forward_pre_hook(lambda m, a: (a[0] * 3.0,))
    _r, r = _both(net, _data((3, 6, 6)))
    assert r.strategy == "frontier"
    # a hook on a module traced through would be skipped by the graph: per-level passes
    inner = _DictInput().eval()
    inner.inner.blocks[0].register_forward_hook(lambda m, a, out: out * 2)
    _r, r = _both(inner, [{"image": x} for x in _data((3, 16, 16))])
    assert r.strategy == "per-level" and "hooks" in r.strategy_note
