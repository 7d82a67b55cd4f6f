"""recalibrate() on torch models: exactness, modes, data shapes, safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BadInputError, RecalibrationError
from bnfold.models import build


def _batches(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[i : i + bs] for i in range(0, x.shape[0], bs)]


class Net(nn.Module):
    """Conv -> BN -> ReLU(inplace) -> Dropout -> Conv -> BN: two depth levels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.drop(torch.relu_(self.bn1(self.conv1(x))))))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _bn_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "tracked" in k}


@pytest.mark.parametrize("bs", [1, 7, 32])
def test_population_mode_equals_whole_data_oracle(correlated_images, oracle, rel_err, bs):
    net = _net()
    x = correlated_images
    shuffled = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(bs))]
    report = bnfold.recalibrate(net, _batches(shuffled, bs), progress=False)
    # oracle: bn1 sees conv1(x); bn2 sees conv2(relu(bn1 with its new stats)) over all data
    with torch.no_grad():
        a1 = net.conv1(x)
        m1, v1 = oracle(a1.numpy())
        a2 = net.conv2(torch.relu(net.bn1(a1)))
        m2, v2 = oracle(a2.numpy())
    assert rel_err(net.bn1.running_mean.numpy(), m1) <= 1e-7
    assert rel_err(net.bn1.running_var.numpy(), v1) <= 1e-7
    assert rel_err(net.bn2.running_mean.numpy(), m2) <= 1e-6
    assert rel_err(net.bn2.running_var.numpy(), v2) <= 1e-6
    assert [b.level for b in report.bns] == [1, 2]
    assert report.passes == 2
    assert int(net.bn1.num_batches_tracked) == len(_batches(shuffled, bs))
    assert report.bns[0].elements == x.shape[0] * 8 * 8
    assert not net.training  # flags restored


def test_population_result_is_batch_size_independent_on_a_deep_net(correlated_images):
    model, _ = build("resnet-mini")
    x = torch.nn.functional.interpolate(correlated_images[:48], size=(16, 16))
    results = []
    for bs in (5, 16):
        bnfold.recalibrate(model, _batches(x, bs), progress=False)
        results.append(_bn_state(model))
    for k in results[0]:
        if "running" in k:
            np.testing.assert_allclose(results[0][k], results[1][k], rtol=2e-6, atol=1e-7)


def test_batch_mode_matches_train_mode_forward_per_batch(correlated_images, oracle, rel_err):
    # with one batch, "batch" mode gives each BN the input it sees in a train-mode forward
    net = _net()
    x = correlated_images[:16]
    bnfold.recalibrate(net, [x], mode="batch", progress=False)
    ref = _net()
    ref.drop.p = 0.0
    seen = {}
    ref.bn2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    ref.train()
    with torch.no_grad():
        ref(x)
    m2, v2 = oracle(seen["x"].numpy())
    assert rel_err(net.bn2.running_var.numpy(), v2) <= 1e-6
    assert rel_err(net.bn2.running_mean.numpy(), m2) <= 1e-6


def test_dropout_is_off_and_model_flags_restored(correlated_images):
    net = _net()
    net.train()
    data = [correlated_images[:8]] * 2
    bnfold.recalibrate(net, data, progress=False)
    first = _bn_state(net)
    bnfold.recalibrate(net, data, progress=False)
    assert all(torch.equal(first[k], v) for k, v in _bn_state(net).items())
    assert net.training and net.drop.training and net.bn1.track_running_stats


def test_batch_shapes_tuple_dict_forward_fn_and_budget(correlated_images):
    x = correlated_images[:20]
    ref = _net()
    bnfold.recalibrate(ref, [x[:12]], progress=False)

    class KwNet(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.inner(image * scale)

    # tuples: first element is the input; budget cuts the second batch to 4 samples
    a = _net()
    r = bnfold.recalibrate(
        a, [(x[:8], 0), (x[8:16], 1), (x[16:], 2)], num_samples=12, progress=False
    )
    assert r.samples == 12 and r.batches == 2
    # dicts: keyword arguments
    b = KwNet(_net())
    bnfold.recalibrate(b, [{"image": x[:6]}, {"image": x[6:12]}], progress=False)
    # forward_fn for anything else
    c = _net()
    bnfold.recalibrate(
        c, [{"pix": x[:12]}], forward_fn=lambda m, batch: m(batch["pix"]), progress=False
    )
    for other in (a, b.inner, c):
        for k, v in _bn_state(ref).items():
            if "running" in k:
                torch.testing.assert_close(_bn_state(other)[k], v, rtol=1e-6, atol=1e-7)


def test_generator_works_in_both_modes(correlated_images):
    gen = (correlated_images[i : i + 8] for i in range(0, 32, 8))
    r = bnfold.recalibrate(_net(), gen, mode="batch", num_batches=3, progress=False)
    assert r.batches == 3
    # population mode replays the generator's batches from memory for its later passes
    gen = (correlated_images[i : i + 8] for i in range(0, 32, 8))
    net = _net()
    r = bnfold.recalibrate(net, gen, progress=False)
    ref = _net()
    bnfold.recalibrate(ref, _batches(correlated_images[:32], 8), progress=False)
    assert r.passes > 1 and r.samples == 32
    for k, v in _bn_state(ref).items():
        assert torch.equal(_bn_state(net)[k], v)


def test_one_shot_data_that_outgrows_the_cache_is_refused_clearly(correlated_images):
    net = _net()
    before = _bn_state(net)
    # neither memory nor a spill file may hold anything: later passes must read data again
    with pytest.raises(BadInputError, match="did not fit"):
        bnfold.recalibrate(
            net, iter(_batches(correlated_images, 8)), data_cache_mb=0, spill_mb=0, progress=False
        )
    for k, v in before.items():
        assert torch.equal(_bn_state(net)[k], v)
    # with a spill file (the default) the one-shot iterator works, and gives the same bits
    r = bnfold.recalibrate(
        net, iter(_batches(correlated_images, 8)), data_cache_mb=0, progress=False
    )
    assert r.strategy == "frontier" and r.peak_spill_mb > 0 and r.peak_memory_mb == 0
    ref = _net()
    bnfold.recalibrate(ref, _batches(correlated_images, 8), progress=False)
    for k, v in _bn_state(ref).items():
        assert torch.equal(_bn_state(net)[k], v)


class _CountingLoader:
    """A re-iterable loader that counts how often it is iterated."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)


def test_population_mode_reads_the_loader_once_when_it_fits(correlated_images):
    loader = _CountingLoader(_batches(correlated_images, 16))
    r = bnfold.recalibrate(_net(), loader, progress=False)
    assert r.passes == 2 and loader.iterations == 1
    # without memory or a spill file every later pass iterates the loader again (the level
    # probe reads its batch from the first pass)
    uncached = _CountingLoader(_batches(correlated_images, 16))
    r0 = bnfold.recalibrate(_net(), uncached, data_cache_mb=0, spill_mb=0, progress=False)
    assert uncached.iterations == r0.passes
    # a cache smaller than the data stops recording and streams: same statistics either way
    part = _CountingLoader(_batches(correlated_images, 16))
    small = correlated_images[:16].nbytes * 1.5 / 2**20
    nets = [_net() for _ in range(3)]
    bnfold.recalibrate(nets[0], loader, progress=False)
    bnfold.recalibrate(nets[1], uncached, data_cache_mb=0, spill_mb=0, progress=False)
    bnfold.recalibrate(nets[2], part, data_cache_mb=small, spill_mb=0, progress=False)
    assert part.iterations > 1
    for k, v in _bn_state(nets[0]).items():
        assert torch.equal(_bn_state(nets[1])[k], v)
        assert torch.equal(_bn_state(nets[2])[k], v)


class _InPlaceInput(nn.Module):
    """Normalises its input in place before the network, as some preprocessing modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(1.0)
        return self.net(x)


def test_a_model_editing_its_input_in_place_sees_the_same_data_every_pass(correlated_images):
    data = _batches(correlated_images, 16)
    model = _InPlaceInput().eval()
    bnfold.recalibrate(model, data, progress=False)
    ref = _net()
    bnfold.recalibrate(ref, _batches(correlated_images - 1.0, 16), progress=False)
    for k, v in _bn_state(ref).items():
        torch.testing.assert_close(_bn_state(model.net)[k], v, rtol=1e-6, atol=0)


def test_negative_data_cache_is_bad_input(correlated_images):
    with pytest.raises(BadInputError, match="data_cache_mb"):
        bnfold.recalibrate(_net(), _batches(correlated_images, 8), data_cache_mb=-1)


def test_empty_loader_is_an_error_and_leaves_model_untouched():
    net = _net()
    before = _bn_state(net)
    with pytest.raises(RecalibrationError, match="no batch"):
        bnfold.recalibrate(net, [], progress=False)
    assert all(torch.equal(before[k], v) for k, v in _bn_state(net).items())


def test_nan_names_the_bn_and_restores(correlated_images):
    net = _net()
    with torch.no_grad():
        net.conv2.bias[1] = float("nan")
    before = _bn_state(net)
    with pytest.raises(RecalibrationError, match="'bn2'"):
        bnfold.recalibrate(net, [correlated_images[:4]], progress=False)
    # bn1 (level 1) had already been written when bn2 failed: it is restored too
    assert all(torch.equal(before[k], v) for k, v in _bn_state(net).items())


# without memory or spill: pass 1 (with the probe) complete, fail in pass 2; with a cache,
# the loader runs once
@pytest.mark.parametrize(("cache_mb", "fail_on"), [(0, 2), (1024, 1)])
def test_loader_raising_midway_restores_everything(correlated_images, cache_mb, fail_on):
    net = _net()
    before = _bn_state(net)

    class Flaky:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            yield correlated_images[:4]
            if self.passes >= fail_on:
                raise OSError("disk went away")
            yield correlated_images[4:8]

    with pytest.raises(OSError, match="disk"):
        bnfold.recalibrate(net, Flaky(), data_cache_mb=cache_mb, spill_mb=0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in _bn_state(net).items())


def test_unreached_shared_and_zero_variance(correlated_images, oracle, rel_err):
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.BatchNorm2d(3)
            self.never = nn.BatchNorm2d(3)
            self.const = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.shared(x)
            b = self.shared(2 * x + 1)  # the same module at a second site
            z = self.const(torch.ones(x.shape[0], 2))  # every value identical
            return a + b + z.sum()

    m = Branchy().eval()
    before = m.never.running_var.clone()
    x = correlated_images[:10]
    r = bnfold.recalibrate(m, _batches(x, 4), progress=False)
    assert r.unreached == ["never"]
    assert torch.equal(m.never.running_var, before)
    pooled = torch.cat([x, 2 * x + 1])
    mean, var = oracle(pooled.numpy())
    assert rel_err(m.shared.running_mean.numpy(), mean) <= 1e-7
    assert rel_err(m.shared.running_var.numpy(), var) <= 1e-7
    assert r.zero_variance == {"const": [0, 1]}
    d = r.to_dict()
    assert d["unreached"] == ["never"] and "model" not in d
    assert '"zero_variance_channels"' in r.to_json()


def test_inplace_false_and_exported_program(correlated_images):
    model, _ = build("conv1d")
    ref = _bn_state(model)
    data = [torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    r = bnfold.recalibrate(model, data, inplace=False, progress=False)
    assert all(torch.equal(ref[k], v) for k, v in _bn_state(model).items())
    ep = torch.export.export(model, (data[0],))
    r_ep = bnfold.recalibrate(ep, data, progress=False)
    assert [b.name for b in r_ep.bns] == ["1", "4"]
    want = {k: v for k, v in r.model.state_dict().items() if "running" in k}
    got = {k: v for k, v in r_ep.model.state_dict().items() if "running" in k}
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(BadInputError, match="mode"):
        bnfold.recalibrate(_net(), [torch.zeros(1, 3, 4, 4)], mode="eval")
    with pytest.raises(BadInputError, match="no BatchNorm"):
        bnfold.recalibrate(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(BadInputError, match="num_samples"):
        bnfold.recalibrate(_net(), [torch.zeros(1, 3, 4, 4)], num_samples=0, mode="batch")


def test_bfloat16_buffers_are_rounded_once(correlated_images, oracle):
    net = _net().to(torch.bfloat16)
    x = correlated_images[:8].to(torch.bfloat16)
    bnfold.recalibrate(net, [x], progress=False)
    import ml_dtypes

    from bnfold.foldmath import round_to

    mean, _ = oracle(net.conv1(x).detach().float().numpy())
    want = round_to(mean, ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(net.bn1.running_mean.float().numpy(), want)
