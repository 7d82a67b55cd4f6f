"""A seeded generator of small random networks for differential fold tests.

A network is a plan (a list of steps) interpreted by :class:`RandomNet.forward`; fx symbolic
tracing unrolls the loop, so every seed traces to a different static graph. The generator
tracks each value's layout (spatial dims, channels, spatial sizes) so that every layer it
adds is valid for its input, and it mixes in the patterns folding must get right: groups and
depthwise convs, every padding mode, transposed convs, Linear on 2-D and 3-D inputs, BN in
train mode or without running statistics, functional ``F.batch_norm`` / ``F.conv2d`` /
``F.linear``, a module called twice, tied weights, a BN module called twice, BN outputs
that are read twice or returned, and the operations a fold reaches through: a constant added
after a conv (per channel, or varying), a channel ``cat`` of convs (an input sometimes read
again) and average pools (adaptive, strided, padded, ``mean``) before a flatten and Linear.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _BatchNormBase

__all__ = ["RandomNet", "build_random", "bn_applications"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@dataclass
class _Value:
    """A tensor in the plan: its name and layout (``spatial`` 0 means ``(N, C)``)."""

    name: str
    spatial: int
    channels: int
    sizes: tuple[int, ...]


class RandomNet(nn.Module):
    """Runs ``plan``: each step is ``(op, out, inputs, info)`` over named values."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[tuple[str, str, tuple[str, ...], dict]] = []
        self.outputs: list[str] = []

    def forward(self, x: torch.Tensor):
        vals = {"x": x}
        for op, out, ins, info in self.plan:
            a = [vals[i] for i in ins]
            if op == "module":
                vals[out] = getattr(self, info["attr"])(a[0])
            elif op == "relu_":
                vals[out] = F.relu(a[0], inplace=True)
            elif op == "add":
                vals[out] = a[0] + a[1]
            elif op == "mul":
                vals[out] = a[0] * torch.sigmoid(a[1])
            elif op == "cat":
                vals[out] = torch.cat(a, 1)
            elif op == "add_param":
                vals[out] = a[0] + getattr(self, info["param"])
            elif op == "pool":
                vals[out] = _pool(a[0], info)
            elif op == "flatten":
                vals[out] = torch.flatten(a[0], 1)
            elif op == "fbn":
                p = info["prefix"]
                vals[out] = F.batch_norm(
                    a[0],
                    getattr(self, p + "rm"),
                    getattr(self, p + "rv"),
                    getattr(self, p + "w") if info["affine"] else None,
                    getattr(self, p + "b") if info["affine"] else None,
                    False,
                    0.1,
                    info["eps"],
                )
            elif op == "fconv":
                p = info["prefix"]
                vals[out] = F.conv2d(
                    a[0],
                    getattr(self, p + "w"),
                    getattr(self, p + "b") if info["bias"] else None,
                    info["stride"],
                    info["padding"],
                    1,
                    info["groups"],
                )
            elif op == "flinear":
                p = info["prefix"]
                vals[out] = F.linear(
                    a[0], getattr(self, p + "w"), getattr(self, p + "b") if info["bias"] else None
                )
        return tuple(vals[o] for o in self.outputs)


def _pool(x: torch.Tensor, info: dict) -> torch.Tensor:
    """An average over spatial positions of each channel."""
    spatial = info["spatial"]  # not x.dim(): fx traces x as a Proxy
    if info["kind"] == "adaptive":
        return getattr(F, f"adaptive_avg_pool{spatial}d")(x, 1)
    if info["kind"] == "mean":
        return x.mean(tuple(range(2, 2 + spatial)), keepdim=True)
    return getattr(F, f"avg_pool{spatial}d")(x, 2, 2, info["padding"])


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.net = RandomNet()
        self.n = 0
        self.bn_calls = 0
        self.train_mode: list[nn.Module] = []

    # -- helpers -------------------------------------------------------------------------
    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def add_module(self, stem: str, module: nn.Module) -> str:
        attr = self.fresh(stem)
        setattr(self.net, attr, module)
        return attr

    def step(self, op: str, ins: tuple[str, ...], info: dict | None = None) -> str:
        out = self.fresh("v")
        self.net.plan.append((op, out, ins, info or {}))
        return out

    def call(self, module_attr: str, v: _Value, **layout) -> _Value:
        out = self.step("module", (v.name,), {"attr": module_attr})
        return _Value(**{**vars(v), "name": out, **layout})

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    # -- layers --------------------------------------------------------------------------
    def groups_for(self, cin: int, cout: int) -> int:
        options = [g for g in range(1, cin + 1) if cin % g == 0 and cout % g == 0]
        return self.rng.choice(options)

    def bn(self, v: _Value, functional_ok: bool = True) -> _Value:
        """A BatchNorm (module or functional) on ``v``, random mode and statistics."""
        self.bn_calls += 1
        c = v.channels
        eps = 10 ** self.rng.uniform(-5, -1)
        affine = self.rng.random() < 0.8
        if functional_ok and self.rng.random() < 0.15:
            p = self.fresh("fbn_") + "_"
            self.net.register_buffer(p + "rm", self.randn(c))
            self.net.register_buffer(p + "rv", torch.rand(c, generator=self.gen) * 2 + 0.1)
            self.net.register_parameter(p + "w", nn.Parameter(self.randn(c)))
            self.net.register_parameter(p + "b", nn.Parameter(self.randn(c)))
            out = self.step("fbn", (v.name,), {"prefix": p, "affine": affine, "eps": eps})
            return _Value(out, v.spatial, c, v.sizes)
        track = self.rng.random() < 0.9
        momentum = None if self.rng.random() < 0.2 else 0.1
        mod = _BN[v.spatial](
            c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track
        )
        with torch.no_grad():
            if track:
                mod.running_mean.copy_(self.randn(c))
                mod.running_var.copy_(torch.rand(c, generator=self.gen) * 2 + 0.1)
            if affine:
                mod.weight.copy_(self.randn(c))
                mod.bias.copy_(self.randn(c))
        if self.rng.random() < 0.1:
            self.train_mode.append(mod)
        return self.call(self.add_module("bn", mod), v)

    def conv(self, v: _Value, cout: int | None = None, keep_shape: bool = False) -> _Value:
        d, cin = v.spatial, v.channels
        rng = self.rng
        cout = cout or rng.choice([cin, rng.randint(2, 8)])
        if rng.random() < 0.2:  # depthwise (channel multiplier 1 or 2)
            cout = cin * rng.choice([1, 2]) if not keep_shape else cout
        groups = cin if cout % cin == 0 and rng.random() < 0.3 else self.groups_for(cin, cout)
        k = rng.choice([1, 2, 3])
        small = min(v.sizes)
        dilation = rng.choice([1, 1, 2]) if small > 2 * (k - 1) + 2 else 1
        stride = 1 if keep_shape else rng.choice([1, 1, 2])
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        span = dilation * (k - 1)
        pad_choice = rng.choice(["0", "half", "same", "valid"])
        if keep_shape:
            pad_choice = "same"
        if pad_choice == "same" and stride != 1:
            pad_choice = "half"
        widest = {"same": span - span // 2, "half": span // 2}.get(pad_choice, 0)
        if widest >= small:  # reflect needs padding < size; keep the others simple too
            mode = "zeros"
        padding: int | str
        if pad_choice == "same":
            padding = "same"
            sizes = v.sizes
        else:
            p = span // 2 if pad_choice == "half" else 0
            padding = p if pad_choice != "valid" else "valid"
            sizes = tuple((s + 2 * p - span - 1) // stride + 1 for s in v.sizes)
            if min(sizes) < 1:
                padding, sizes, k, stride = 0, v.sizes, 1, 1
        mod = _CONV[d](
            cin,
            cout,
            k,
            stride=stride,
            padding=padding,
            dilation=dilation if k > 1 else 1,
            groups=groups,
            bias=rng.random() < 0.5,
            padding_mode=mode,
        )
        return self.call(self.add_module("conv", mod), v, channels=cout, sizes=sizes)

    def conv_transpose(self, v: _Value) -> _Value:
        d, cin, rng = v.spatial, v.channels, self.rng
        cout = rng.randint(2, 8)
        groups = self.groups_for(cin, cout)
        k, stride = rng.choice([1, 2, 3]), rng.choice([1, 2])
        pad = rng.choice([0, 1]) if k > 1 else 0
        out_pad = rng.choice(range(stride))
        sizes = tuple((s - 1) * stride - 2 * pad + (k - 1) + out_pad + 1 for s in v.sizes)
        if min(sizes) < 1 or max(sizes) > 16:
            k, stride, pad, out_pad, sizes = 1, 1, 0, 0, v.sizes
        mod = _CONVT[d](
            cin,
            cout,
            k,
            stride=stride,
            padding=pad,
            output_padding=out_pad,
            groups=groups,
            bias=rng.random() < 0.5,
        )
        return self.call(self.add_module("convt", mod), v, channels=cout, sizes=sizes)

    def linear(self, v: _Value) -> _Value:
        """Linear on ``(N, C)``, or on the last axis of ``(N, C, L)`` (BN1d axis differs)."""
        if v.spatial == 1:
            n_out = self.rng.randint(2, 9)
            mod = nn.Linear(v.sizes[0], n_out, bias=self.rng.random() < 0.7)
            return self.call(self.add_module("fc3d", mod), v, sizes=(n_out,))
        n_out = self.rng.randint(2, 9)
        bias = self.rng.random() < 0.7
        if self.rng.random() < 0.25:
            p = self.fresh("flin_") + "_"
            self.net.register_parameter(p + "w", nn.Parameter(self.randn(n_out, v.channels) / 3))
            self.net.register_parameter(p + "b", nn.Parameter(self.randn(n_out)))
            out = self.step("flinear", (v.name,), {"prefix": p, "bias": bias})
            return _Value(out, 0, n_out, ())
        mod = nn.Linear(v.channels, n_out, bias=bias)
        return self.call(self.add_module("fc", mod), v, channels=n_out)

    def fconv(self, v: _Value) -> _Value:
        cin, cout = v.channels, self.rng.randint(2, 8)
        groups = self.groups_for(cin, cout)
        stride = self.rng.choice([1, 2])
        padding = self.rng.choice([0, 1])
        p = self.fresh("fconv_") + "_"
        w = self.randn(cout, cin // groups, 3, 3) / 3
        self.net.register_parameter(p + "w", nn.Parameter(w))
        bias = self.rng.random() < 0.5
        self.net.register_parameter(p + "b", nn.Parameter(self.randn(cout)))
        sizes = tuple((s + 2 * padding - 3) // stride + 1 for s in v.sizes)
        if min(sizes) < 1:
            return v
        info = {"prefix": p, "bias": bias, "stride": stride, "padding": padding, "groups": groups}
        out = self.step("fconv", (v.name,), info)
        return _Value(out, 2, cout, sizes)

    # -- blocks --------------------------------------------------------------------------
    def relu(self, v: _Value) -> _Value:
        return _Value(self.step("relu_", (v.name,)), v.spatial, v.channels, v.sizes)

    def block(self, v: _Value) -> _Value:
        """One random block appended to ``v``; returns the new current value."""
        rng = self.rng
        choices = ["conv_bn", "bn_conv", "bn", "relu"]
        if v.spatial >= 1:
            choices += ["convt_bn", "residual", "cat", "twice", "tied", "bn_twice", "gate"]
            choices += ["flatten_fc", "extra", "cat_bn", "add_bn", "bn_pool_fc"]
        if v.spatial == 2:
            choices += ["fconv"]
        if v.spatial in (0, 1):
            choices += ["fc_bn", "bn_fc"]
        kind = rng.choice(choices)
        if kind == "conv_bn":
            return self.bn(self.conv(v)) if v.spatial else self.bn(self.linear(v))
        if kind == "bn_conv":
            out = self.bn(v)
            if rng.random() < 0.5:
                out = self.relu(out)
            return self.conv(out) if v.spatial else self.linear(out)
        if kind == "bn":
            return self.bn(v)
        if kind == "relu":
            return self.relu(v)
        if kind == "convt_bn":
            return self.bn(self.conv_transpose(v))
        if kind in ("fc_bn", "bn_fc"):
            return self.bn(self.linear(v)) if kind == "fc_bn" else self.linear(self.bn(v))
        if kind == "fconv":
            out = self.fconv(v)
            return self.bn(out) if rng.random() < 0.7 else out
        if kind == "residual":
            branch = self.bn(self.conv(v, cout=v.channels, keep_shape=True))
            return _Value(**{**vars(v), "name": self.step("add", (v.name, branch.name))})
        if kind == "gate":
            body = self.bn(self.conv(v, cout=v.channels, keep_shape=True))
            gate = self.conv(v, cout=v.channels, keep_shape=True)
            out = self.step("mul", (body.name, gate.name))
            return _Value(out, v.spatial, v.channels, v.sizes)
        if kind == "cat":
            a = self.bn(self.conv(v, keep_shape=True))
            b = self.bn(self.conv(v, keep_shape=True))
            out = self.step("cat", (a.name, b.name))
            return _Value(out, v.spatial, a.channels + b.channels, v.sizes)
        if kind == "twice":
            attr = self.add_module(
                "shared_conv",
                _CONV[v.spatial](v.channels, v.channels, 3, padding="same", bias=False),
            )
            once = self.bn(self.call(attr, v))
            return self.bn(self.call(attr, once))
        if kind == "tied":
            a = _CONV[v.spatial](v.channels, v.channels, 1)
            b = _CONV[v.spatial](v.channels, v.channels, 1)
            b.weight = a.weight
            first = self.bn(self.call(self.add_module("tied_a", a), v))
            return self.bn(self.call(self.add_module("tied_b", b), first))
        if kind == "bn_twice":
            conv = self.conv(v, cout=v.channels, keep_shape=True)
            bn = self.bn(conv, functional_ok=False)
            bn_attr = self.net.plan[-1][3]["attr"]
            self.bn_calls += 1
            again = self.call(bn_attr, self.conv(bn, cout=v.channels, keep_shape=True))
            return again
        if kind == "flatten_fc":
            flat = self.step("flatten", (v.name,))
            feats = v.channels * math.prod(v.sizes)
            fv = _Value(flat, 0, feats, ())
            if feats > 400:
                return v
            return self.linear(fv)
        if kind == "cat_bn":  # MixConv: one BN after a channel cat
            a = self.conv(v, keep_shape=True)
            b = self.conv(v, keep_shape=True)
            if rng.random() < 0.25:  # DenseNet: an input is read again
                self.net.outputs.append(a.name)
            out = self.step("cat", (a.name, b.name))
            return self.bn(_Value(out, v.spatial, a.channels + b.channels, v.sizes))
        if kind == "add_bn":  # a bias added outside the conv
            c = self.conv(v, keep_shape=True)
            ones = (1,) * v.spatial
            shape = rng.choice(
                [(1, c.channels, *ones), (c.channels, *ones), (1,), (1, c.channels, *v.sizes)]
            )
            attr = self.fresh("shift")
            self.net.register_parameter(attr, nn.Parameter(self.randn(*shape)))
            out = self.step("add_param", (c.name,), {"param": attr})
            return self.bn(_Value(out, c.spatial, c.channels, c.sizes))
        if kind == "bn_pool_fc":  # a classifier head
            bn = self.bn(v)
            kind = rng.choice(["adaptive", "mean", "avg", "avg"])
            pad = 1 if kind == "avg" and rng.random() < 0.3 else 0
            if kind == "avg" and min(v.sizes) < 2:
                kind = "adaptive"
            sizes = (
                tuple((n + 2 * pad - 2) // 2 + 1 for n in v.sizes)
                if kind == "avg"
                else (1,) * v.spatial
            )
            info = {"kind": kind, "padding": pad, "spatial": v.spatial}
            out = self.step("pool", (bn.name,), info)
            flat = self.step("flatten", (out,))
            return self.linear(_Value(flat, 0, v.channels * math.prod(sizes), ()))
        if kind == "extra":
            out = self.bn(self.conv(v))
            self.net.outputs.append(out.name)
            return self.conv(out)
        raise AssertionError(kind)


def build_random(seed: int, dtype: torch.dtype = torch.float32) -> tuple[RandomNet, torch.Tensor]:
    """A random network and an input for it, both of ``dtype``; the same seed, the same net."""
    with torch.random.fork_rng():  # layers initialise from the global generator
        torch.manual_seed(seed)
        return _build(seed, dtype)


def _build(seed: int, dtype: torch.dtype) -> tuple[RandomNet, torch.Tensor]:
    b = _Builder(seed)
    spatial = b.rng.choice([0, 1, 2, 2, 3])
    channels = b.rng.randint(2, 6)
    sizes = {0: (), 1: (b.rng.randint(8, 14),), 2: (b.rng.randint(5, 9),) * 2, 3: (4, 5, 4)}
    v = _Value("x", spatial, channels, sizes[spatial])
    for _ in range(b.rng.randint(2, 6)):
        v = b.block(v)
    b.net.outputs.insert(0, v.name)
    x = torch.randn(3, channels, *sizes[spatial], generator=b.gen)
    net = b.net.to(dtype)
    net.eval()
    for mod in b.train_mode:
        mod.train()
    return net, x.to(dtype)


def bn_applications(net: RandomNet) -> int:
    """How many BatchNorms the plan uses: BN modules (once each, however often called) and
    ``F.batch_norm`` calls, which is how many decisions a fold report must hold."""
    modules = set()
    calls = 0
    for op, _out, _ins, info in net.plan:
        if op == "fbn":
            calls += 1
        elif op == "module" and isinstance(getattr(net, info["attr"]), _BatchNormBase):
            modules.add(info["attr"])
    return calls + len(modules)
