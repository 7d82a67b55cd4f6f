"""A seeded generator of small, valid, random ONNX graphs full of BatchNormalization nodes.

Each graph is a chain of blocks on one activation stream (N, C, d...) or (N, F): Conv (1-3
spatial dims, groups, depthwise, zero or no padding, every ``auto_pad``, strides,
dilations), ConvTranspose (groups, ``output_padding``, strides), BN (chains, several
readers, graph outputs, training mode), Relu, residual Adds of two branches, Flatten/Reshape,
Gemm (alpha, beta, transA, transB, C of every broadcastable shape) and MatMul(+Add), and the
blocks a fold must reach through: Conv + Add(constant of a per-channel or a varying shape),
channel Concats of convs (an input sometimes read again), and average pools (global, strided,
padded) before a Flatten. Each
parameter is sometimes a ``Constant`` node (``value`` or ``value_floats``), a graph input, or
an initializer that is also a graph input, so the guards meet every kind of storage.

The generator only builds what the ONNX spec allows; it knows nothing of the fold pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["RandomGraph", "build"]


@dataclass
class RandomGraph:
    """A generated model and the values to feed it.

    Attributes:
        model: the model.
        feeds: a value for every graph input without an initializer.
        half: activations are float16.
        bns: names of every BatchNormalization node.
    """

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    half: bool
    bns: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self, rng: np.random.Generator, opset: int, half: bool) -> None:
        self.rng = rng
        self.opset = opset
        self.half = half
        self.act = np.float16 if half else np.float32
        self.elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.bns: list[str] = []
        self.k = 0
        self.batch = 2

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def param(self, base: str, value: np.ndarray, *, storable: bool = True) -> str:
        """Store ``value`` as an initializer, a Constant node or a graph input."""
        name = self.name(base)
        value = np.asarray(value)
        r = self.rng.random() if storable else 1.0
        if r < 0.015:  # a plain graph input: not a constant, must not fold
            self.inputs.append(
                helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)
                )
            )
            self.feeds[name] = value
        elif r < 0.03:  # an initializer the caller may override
            self.inits.append(numpy_helper.from_array(value, name))
            self.inputs.append(
                helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)
                )
            )
        elif r < 0.15:
            if (
                self.opset >= 12
                and value.dtype == np.float32
                and value.ndim == 1
                and self.chance(0.5)
            ):
                node = helper.make_node(
                    "Constant", [], [name], value_floats=[float(v) for v in value]
                )
            elif (
                self.opset >= 12
                and value.dtype == np.float32
                and value.ndim == 0
                and self.chance(0.5)
            ):
                node = helper.make_node("Constant", [], [name], value_float=float(value))
            else:
                node = helper.make_node(
                    "Constant", [], [name], value=numpy_helper.from_array(value)
                )
            self.nodes.append(node)
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, *shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / np.sqrt(max(fan_in, 1))
        return (self.rng.standard_normal(shape) * scale).astype(self.act)

    # ---- blocks --------------------------------------------------------------------------

    def bn(self, x: str, c: int, rank: int) -> str:
        stat = np.float32 if (self.half and self.opset >= 15 and self.chance(0.7)) else self.act
        scale = (self.rng.random(c) + 0.5).astype(stat)
        bias = (self.rng.standard_normal(c) * 0.3).astype(stat)
        mean = (self.rng.standard_normal(c) * 0.5).astype(stat)
        var = (self.rng.random(c) * 1.5 + 0.25).astype(stat)
        if self.opset >= 15 and self.chance(0.2):  # BN-15 types scale/bias and mean/var apart
            scale, bias = scale.astype(self.act), bias.astype(self.act)
        eps = float(self.rng.choice([1e-5, 1e-3, 0.1, 1e-12, 0.5]))
        params = [
            self.param("bn_scale", scale),
            self.param("bn_bias", bias),
            self.param("bn_mean", mean),
            self.param("bn_var", var),
        ]
        y = self.name("bn_out")
        name = self.name("bn")
        outputs = [y]
        attrs: dict[str, object] = {"epsilon": eps}
        if self.opset >= 14 and self.chance(0.06):
            attrs["training_mode"] = 1
            # Batch statistics over a batch of two amplify rounding by up to 1/sqrt(eps):
            # a large eps keeps float32 noise upstream from dominating the comparison.
            attrs["epsilon"] = 1.0
            outputs += [self.name("running_mean"), self.name("running_var")]
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *params], outputs, name, **attrs)
        )
        self.bns.append(name)
        if self.chance(0.06):
            self.outputs.append(helper.make_tensor_value_info(y, self.elem, [None] * rank))
        return y

    def conv(self, x: str, shape: list[int]) -> tuple[str, list[int]] | None:
        c_in, spatial = shape[1], shape[2:]
        groups = 1
        if self.chance(0.3):
            divisors = [g for g in range(2, c_in + 1) if c_in % g == 0]
            groups = int(self.rng.choice(divisors)) if divisors else 1
        depthwise = groups == c_in and groups > 1
        c_out = (
            groups * int(self.rng.integers(1, 3)) if groups > 1 else int(self.rng.integers(2, 7))
        )
        if depthwise and self.chance(0.5):
            c_out = c_in
        k = [int(self.rng.integers(1, 4)) for _ in spatial]
        strides = [int(self.rng.integers(1, 3)) for _ in spatial]
        dil = [int(self.rng.integers(1, 3)) if self.chance(0.3) else 1 for _ in spatial]
        attrs: dict[str, object] = {"kernel_shape": k}
        if groups > 1 or self.chance(0.3):
            attrs["group"] = groups
        if any(s > 1 for s in strides) or self.chance(0.3):
            attrs["strides"] = strides
        if any(d > 1 for d in dil):
            attrs["dilations"] = dil
        mode = self.rng.choice(["pads", "zero", "none", "SAME_UPPER", "SAME_LOWER", "VALID"])
        if mode in ("SAME_UPPER", "SAME_LOWER"):  # onnxruntime refuses dilated SAME padding
            dil = [1] * len(spatial)
            attrs.pop("dilations", None)
        eff = [(kk - 1) * d + 1 for kk, d in zip(k, dil, strict=True)]
        if mode == "pads":
            pads = [int(self.rng.integers(0, kk)) for kk in eff] + [
                int(self.rng.integers(0, kk)) for kk in eff
            ]
            attrs["pads"] = pads
        elif mode == "zero":
            attrs["pads"] = [0] * (2 * len(spatial))
        elif mode != "none":
            attrs["auto_pad"] = str(mode)
        out_sp = []
        for d, (n, e, s) in enumerate(zip(spatial, eff, strides, strict=True)):
            if mode in ("SAME_UPPER", "SAME_LOWER"):
                o = -(-n // s)
            else:
                p = attrs["pads"][d] + attrs["pads"][d + len(spatial)] if "pads" in attrs else 0  # type: ignore[index]
                o = (n + p - e) // s + 1
            if o < 1:
                return None
            out_sp.append(o)
        w = self.param("conv_w", self.weight(c_out, c_in // groups, *k))
        inputs = [x, w]
        if self.chance(0.5):
            inputs.append(self.param("conv_b", self.weight(c_out)))
        y = self.name("conv_out")
        self.nodes.append(helper.make_node("Conv", inputs, [y], self.name("conv"), **attrs))
        return y, [shape[0], c_out, *out_sp]

    def conv_transpose(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        c_in, spatial = shape[1], shape[2:]
        groups = int(self.rng.choice([g for g in (1, 2, 3, 4) if c_in % g == 0]))
        per_group_out = int(self.rng.integers(1, 4))
        k = [int(self.rng.integers(1, 4)) for _ in spatial]
        strides = [int(self.rng.integers(1, 3)) for _ in spatial]
        out_pad = [int(self.rng.integers(0, s)) for s in strides]
        pads = [int(self.rng.integers(0, kk)) for kk in k] * 2
        attrs: dict[str, object] = {"kernel_shape": k, "strides": strides, "pads": pads}
        if groups > 1 or self.chance(0.3):
            attrs["group"] = groups
        if any(out_pad):
            attrs["output_padding"] = out_pad
        out_sp = [
            s * (n - 1) + op + kk - 2 * p
            for n, s, op, kk, p in zip(spatial, strides, out_pad, k, pads[: len(k)], strict=True)
        ]
        if min(out_sp) < 1:
            attrs["pads"] = [0] * (2 * len(k))
            out_sp = [
                s * (n - 1) + op + kk
                for n, s, op, kk in zip(spatial, strides, out_pad, k, strict=True)
            ]
        w = self.param("convt_w", self.weight(c_in, per_group_out, *k))
        inputs = [x, w]
        if self.chance(0.5):
            inputs.append(self.param("convt_b", self.weight(groups * per_group_out)))
        y = self.name("convt_out")
        self.nodes.append(
            helper.make_node("ConvTranspose", inputs, [y], self.name("convt"), **attrs)
        )
        return y, [shape[0], groups * per_group_out, *out_sp]

    def gemm(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        m, k = shape
        n = int(self.rng.integers(2, 7))
        trans_a = self.chance(0.2)
        trans_b = self.chance(0.5)
        a = x
        if trans_a:
            a = self.name("transposed")
            self.nodes.append(helper.make_node("Transpose", [x], [a], perm=[1, 0]))
        b = self.weight(n, k) if trans_b else self.weight(k, n)
        inputs = [a, self.param("gemm_b", b)]
        c_shape = self.rng.choice(["none", "scalar", "one", "row", "row2d", "full"])
        if c_shape == "none" and self.opset < 11:  # C is optional from Gemm-11 on
            c_shape = "row"
        shapes = {"scalar": (), "one": (1,), "row": (n,), "row2d": (1, n), "full": (m, n)}
        if c_shape != "none":
            c = (self.rng.standard_normal(shapes[str(c_shape)]) * 0.3).astype(self.act)
            inputs.append(self.param("gemm_c", c))
        attrs: dict[str, object] = {}
        if trans_a:
            attrs["transA"] = 1
        if trans_b or self.chance(0.2):
            attrs["transB"] = int(trans_b)
        if self.chance(0.4):
            attrs["alpha"] = float(self.rng.choice([0.5, 2.0, -1.25]))
        if self.chance(0.4):
            attrs["beta"] = float(self.rng.choice([0.5, 2.0, -0.75]))
        y = self.name("gemm_out")
        self.nodes.append(helper.make_node("Gemm", inputs, [y], self.name("gemm"), **attrs))
        return y, [m, n]

    def matmul(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        n = int(self.rng.integers(2, 7))
        w = self.param("mm_w", self.weight(shape[-1], n))
        y = self.name("mm_out")
        self.nodes.append(helper.make_node("MatMul", [x, w], [y], self.name("matmul")))
        if self.chance(0.6):
            b = self.param("mm_b", (self.rng.standard_normal(n) * 0.3).astype(self.act))
            z = self.name("add_out")
            ins = [y, b] if self.chance(0.7) else [b, y]
            self.nodes.append(helper.make_node("Add", ins, [z], self.name("add")))
            y = z
        return y, [*shape[:-1], n]

    def flatten(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        features = int(np.prod(shape[1:]))
        y = self.name("flat")
        if self.chance(0.5):
            self.nodes.append(helper.make_node("Flatten", [x], [y], self.name("flatten")))
        else:
            target = np.array([0, -1] if self.chance(0.5) else [shape[0], features], np.int64)
            t = self.name("shape")
            self.inits.append(numpy_helper.from_array(target, t))
            self.nodes.append(helper.make_node("Reshape", [x, t], [y], self.name("reshape")))
        return y, [shape[0], features]

    def relu(self, x: str) -> str:
        y = self.name("relu_out")
        self.nodes.append(helper.make_node("Relu", [x], [y], self.name("relu")))
        return y

    def residual(self, x: str, shape: list[int]) -> str:
        """``Add(branch(x), x')`` where both sides keep the shape: several readers of x."""
        c, spatial = shape[1], shape[2:]
        k = [1 if self.chance(0.5) else 3 for _ in spatial]
        pads = [kk // 2 for kk in k] * 2
        w = self.param("res_w", self.weight(c, c, *k))
        a = self.name("res_conv")
        self.nodes.append(
            helper.make_node("Conv", [x, w], [a], self.name("conv"), kernel_shape=k, pads=pads)
        )
        if self.chance(0.6):
            a = self.bn(a, c, len(shape))
        other = self.bn(x, c, len(shape)) if self.chance(0.3) else x
        y = self.name("sum")
        self.nodes.append(helper.make_node("Add", [a, other], [y], self.name("add")))
        return y

    def conv_add(self, x: str, shape: list[int]) -> tuple[str, list[int]] | None:
        """A Conv, then an Add of a constant: per channel (a bias) or varying (not one)."""
        made = self.conv(x, shape)
        if made is None:
            return None
        y, out = made
        c, rank = out[1], len(out)
        form = self.rng.choice(["1C11", "C11", "scalar", "varying"])
        dims = {
            "1C11": [1, c] + [1] * (rank - 2),
            "C11": [c] + [1] * (rank - 2),
            "scalar": [1],
            "varying": [1, c, *out[2:]],
        }[str(form)]
        addend = self.param("add_c", (self.rng.standard_normal(dims) * 0.3).astype(self.act))
        z = self.name("add_out")
        pair = [y, addend] if self.chance(0.5) else [addend, y]
        self.nodes.append(helper.make_node("Add", pair, [z], self.name("add")))
        return z, out

    def concat(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        """Convs of one input concatenated along the channels; one input may be read again."""
        spatial = shape[2:]
        parts, channels = [], 0
        for _ in range(int(self.rng.integers(2, 4))):
            c = int(self.rng.integers(1, 5))
            k = [1 if self.chance(0.5) else 3 for _ in spatial]
            w = self.param("cat_w", self.weight(c, shape[1], *k))
            y = self.name("cat_in")
            inputs = [x, w] + ([self.param("cat_b", self.weight(c))] if self.chance(0.5) else [])
            attrs = {"kernel_shape": k, "pads": [kk // 2 for kk in k] * 2}
            self.nodes.append(helper.make_node("Conv", inputs, [y], self.name("conv"), **attrs))
            parts.append(y)
            channels += c
        if self.chance(0.25):  # DenseNet: a concatenated feature map is read elsewhere too
            self.outputs.append(
                helper.make_tensor_value_info(parts[0], self.elem, [None] * len(shape))
            )
        axis = 1 if self.chance(0.7) else 1 - len(shape)
        y = self.name("cat_out")
        self.nodes.append(helper.make_node("Concat", parts, [y], self.name("concat"), axis=axis))
        return y, [shape[0], channels, *spatial]

    def pool(self, x: str, shape: list[int]) -> tuple[str, list[int]]:
        """An average pool: global, or strided with or without padding."""
        y = self.name("pool_out")
        spatial = shape[2:]
        if self.chance(0.5) or min(spatial) < 2:
            self.nodes.append(helper.make_node("GlobalAveragePool", [x], [y], self.name("gap")))
            return y, [*shape[:2], *([1] * len(spatial))]
        pad = 1 if self.chance(0.3) else 0
        k = [2] * len(spatial)
        attrs: dict[str, object] = {"kernel_shape": k, "strides": k, "pads": [pad] * (2 * len(k))}
        if self.chance(0.5):
            attrs["count_include_pad"] = 1
        self.nodes.append(helper.make_node("AveragePool", [x], [y], self.name("avg"), **attrs))
        return y, [*shape[:2], *[(n + 2 * pad - 2) // 2 + 1 for n in spatial]]

    # ---- graphs --------------------------------------------------------------------------

    def spatial_stream(self, x: str, shape: list[int], depth: int) -> tuple[str, list[int]]:
        for _ in range(depth):
            r = self.rng.random()
            if self.chance(0.2):  # a block a fold must reach through
                if self.chance(0.5):
                    made = self.conv_add(x, shape)
                    if made is not None:
                        x, shape = made
                        x = self.bn(x, shape[1], len(shape))
                else:
                    x, shape = self.concat(x, shape)
                    x = self.bn(x, shape[1], len(shape))
            elif r < 0.4:
                made = self.conv(x, shape)
                if made is not None:
                    x, shape = made
                    x = self.bn(x, shape[1], len(shape))
                    if self.chance(0.2):
                        x = self.bn(x, shape[1], len(shape))
            elif r < 0.55:
                x, shape = self.conv_transpose(x, shape)
                x = self.bn(x, shape[1], len(shape))
            elif r < 0.7:
                x = self.bn(x, shape[1], len(shape))
                if self.chance(0.3):
                    x = self.bn(x, shape[1], len(shape))
                made = self.conv(x, shape)
                if made is not None:
                    x, shape = made
            elif r < 0.85:
                x = self.residual(x, shape)
            else:
                x = self.relu(x)
        return x, shape

    def dense_stream(self, x: str, shape: list[int], depth: int) -> tuple[str, list[int]]:
        for _ in range(depth):
            r = self.rng.random()
            if r < 0.3:
                x, shape = self.gemm(x, shape)
                x = self.bn(x, shape[1], 2)
            elif r < 0.5:
                x, shape = self.matmul(x, shape)
                x = self.bn(x, shape[1], 2)
            elif r < 0.75:
                x = self.bn(x, shape[1], 2)
                if self.chance(0.3):
                    x = self.bn(x, shape[1], 2)
                x, shape = self.gemm(x, shape) if self.chance(0.6) else self.matmul(x, shape)
            else:
                x = self.relu(x)
        return x, shape


def build(seed: int) -> RandomGraph:
    """The random graph of ``seed`` (same seed, same model)."""
    rng = np.random.default_rng(seed)
    opset = int(rng.choice([9, 14, 15, 15]))
    half = opset >= 14 and bool(rng.random() < 0.2)
    b = _Builder(rng, opset, half)
    kind = rng.choice(["spatial", "spatial", "dense", "seq"])
    if kind == "dense":
        shape = [b.batch, int(rng.integers(2, 9))]
        x = "input"
        b.inputs.insert(0, helper.make_tensor_value_info(x, b.elem, shape))
        y, shape = b.dense_stream(x, shape, int(rng.integers(1, 5)))
    elif kind == "seq":  # (N, C, L) through MatMul on the last axis: BN axis != MatMul axis
        shape = [b.batch, int(rng.integers(2, 6)), int(rng.integers(2, 6))]
        x = "input"
        b.inputs.insert(0, helper.make_tensor_value_info(x, b.elem, shape))
        y = x
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.5:
                y, shape = b.matmul(y, shape)
            y = b.bn(y, shape[1], 3)
    else:
        rank = int(rng.choice([3, 4, 4, 5]))
        size = {3: (5, 10), 4: (4, 9), 5: (3, 6)}[rank]
        shape = [b.batch, int(rng.integers(1, 6))] + [
            int(rng.integers(*size)) for _ in range(rank - 2)
        ]
        x = "input"
        b.inputs.insert(0, helper.make_tensor_value_info(x, b.elem, shape))
        y, shape = b.spatial_stream(x, shape, int(rng.integers(1, 5)))
        if rng.random() < 0.4:
            if rng.random() < 0.5:
                y = b.bn(y, shape[1], len(shape))
                if rng.random() < 0.5:  # BN -> average pool -> Flatten -> Gemm/MatMul
                    y, shape = b.pool(y, shape)
            y, shape = b.flatten(y, shape)
            y, shape = b.dense_stream(y, shape, int(rng.integers(1, 3)))
    out_names = {o.name for o in b.outputs}
    if y not in out_names:
        b.outputs.insert(0, helper.make_tensor_value_info(y, b.elem, [None] * len(shape)))
    graph = helper.make_graph(b.nodes, f"random{seed}", b.inputs, b.outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    dims = [d.dim_value for d in b.inputs[0].type.tensor_type.shape.dim]
    feeds = {"input": rng.standard_normal(dims).astype(b.act)}
    feeds.update(b.feeds)
    return RandomGraph(model=model, feeds=feeds, half=half, bns=b.bns)
