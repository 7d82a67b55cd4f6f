"""Apply one fold to the graph: new parameters from :mod:`bnfold.foldmath`, then rewiring.

Parameters are never edited in place: each fold writes new initializers named
``<source>__bnfold_<bn>`` (unique in the graph), points the partner at them, and removes the
old ones only when nothing else reads them. A weight shared with another node therefore keeps
its value for that node (copy on write).

Backward, the partner (or the Add after a MatMul) takes over the BN's output name, so every
reader downstream is unchanged. Forward, the partner (or the Flatten before it) reads the BN's
input instead of its output. A MatMul has no bias, so a fold that creates one adds an ``Add``
right after it, which takes over the MatMul's output name.

Folds of a chain (Conv -> BN -> BN) start from the float64 result of the previous fold rather
than from its rounded initializers, so the final parameters are rounded once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from bnfold import foldmath
from bnfold.onnxfold.discover import Site, bias_input
from bnfold.onnxfold.graph import GraphIndex, attr, attr_float, attr_int
from bnfold.sites import Direction, FoldDecision

__all__ = ["Rewriter"]


class Rewriter:
    """Applies folds to one indexed graph, remembering exact float64 results for chains."""

    def __init__(self, g: GraphIndex) -> None:
        self.g = g
        #: new initializer name -> its float64 value before rounding (only while a chain
        #: may still extend it)
        self.exact: dict[str, np.ndarray] = {}
        #: new initializer name -> the original parameter names it derives from
        self.origin: dict[str, list[str]] = {}
        #: new initializer name -> the name its own name derives from
        self.root: dict[str, str] = {}

    # ---- values ----------------------------------------------------------------------------

    def _value64(self, name: str) -> np.ndarray:
        if name in self.exact:
            return self.exact[name]
        value = self.g.constant(name)
        if value is None:  # the guards checked constness; this is a broken invariant
            raise RuntimeError(f"parameter {name} is not a constant")
        return np.asarray(value, dtype=np.float64)

    def _dtype_of(self, name: str) -> np.dtype:
        info = self.g.value_info(name)
        if info is None:  # guards checked the dtype; a constant always has one
            return np.asarray(self.g.constant(name)).dtype
        return info.np_dtype

    def _sources(self, name: str) -> list[str]:
        return list(self.origin.get(name, [name]))

    def _affine(self, bn: onnx.NodeProto) -> tuple[foldmath.Affine, list[str]]:
        _, scale, bias, mean, var = bn.input[:5]
        eps = attr_float(bn, "epsilon", 1e-5)
        affine = foldmath.bn_affine(
            self._value64(mean),
            self._value64(var),
            eps,
            self._value64(scale),
            self._value64(bias),
        )
        return affine, [scale, bias, mean, var]

    def _write(
        self,
        base: str,
        bn_name: str,
        value64: np.ndarray,
        dtype: np.dtype,
        sources: list[str],
        like: str | None,
        keep_exact: bool,
    ) -> str:
        """Round ``value64`` once into ``dtype`` and add it as a new initializer."""
        root = self.root.get(base, base)  # a chain names the original, not a copy
        name = self.g.unique_name(f"{root}__bnfold_{bn_name}")
        self.root[name] = root
        like_proto = self.g.tensor_proto(like) if like else None
        self.g.add_initializer(name, foldmath.round_to(value64, dtype), like_proto)
        self.origin[name] = list(dict.fromkeys(sources))
        if keep_exact:
            self.exact[name] = value64
        return name

    def _write_pair(
        self,
        bn_name: str,
        w_name: str,
        old_bias: str | None,
        new_w: np.ndarray,
        new_b: np.ndarray,
        bn_params: list[str],
        chain: bool,
    ) -> tuple[str, str]:
        """Write a fold's new weight and bias; a missing bias takes the weight's dtype."""
        w_dtype = self._dtype_of(w_name)
        b_dtype = self._dtype_of(old_bias) if old_bias else w_dtype
        new_w_name = self._write(
            w_name, bn_name, new_w, w_dtype, [*self._sources(w_name), *bn_params], w_name, chain
        )
        b_base = old_bias or f"{w_name}_bias"
        b_sources = [*self._sources(old_bias), *bn_params] if old_bias else bn_params
        new_b_name = self._write(
            b_base, bn_name, new_b, b_dtype, b_sources, old_bias or w_name, chain
        )
        return new_w_name, new_b_name

    def _add_bias_after(self, mm: onnx.NodeProto, bias: str, bn_name: str) -> onnx.NodeProto:
        """Give a MatMul its bias: an Add after it takes over the MatMul's output name."""
        g = self.g
        out = mm.output[0]
        g.set_output(mm, 0, g.unique_name(f"{out}__bnfold_matmul"))
        add = helper.make_node(
            "Add", [mm.output[0], bias], [out], name=g.unique_name(f"{bn_name}__bnfold_add")
        )
        return g.insert_after(mm, add)

    def _remove_bn(self, bn: onnx.NodeProto) -> None:
        self.g.remove_node(bn)
        for i in bn.input:
            self.g.consumers[i] = [n for n in self.g.consumers[i] if n is not bn]

    # ---- folds -----------------------------------------------------------------------------

    def apply(self, site: Site) -> FoldDecision:
        """Fold ``site`` (already approved by the guards) and describe the result."""
        if site.direction is Direction.BACKWARD:
            return self._backward(site)
        return self._forward(site)

    def _backward(self, site: Site) -> FoldDecision:
        g, bn = self.g, site.bn
        affine, bn_params = self._affine(bn)
        x, y = bn.input[0], bn.output[0]
        parts = site.parts or [site]
        pieces = foldmath.split(affine, [p.channels for p in parts]) if site.parts else [affine]
        # A chain continues when another BN reads this fold's output.
        chain = any(n.op_type == "BatchNormalization" for n in g.users(y))
        params: dict[str, list[str]] = {}
        dead = list(bn.input[1:])
        out_node: onnx.NodeProto | None = site.concat or site.tail
        for part, piece in zip(parts, pieces, strict=True):
            made, node, gone = self._into_producer(part, piece, bn_params, site.name, chain)
            params.update(made)
            dead += gone
            out_node = out_node or node
        assert out_node is not None
        self._remove_bn(bn)
        g.set_output(out_node, 0, y)
        g.remove_dead(dead)
        # What still reads x reads only its shape or dtype (the guards saw to that), which y
        # shares: point it there, since x no longer exists.
        for reader in g.users(x):
            g.replace_input(reader, x, y)
        return FoldDecision.fold(
            site.name,
            Direction.BACKWARD,
            site.facts.partner or parts[0].bn.op_type,
            params=params,
            tensor=y,
        )

    def _into_producer(
        self,
        part: Site,
        affine: foldmath.Affine,
        bn_params: list[str],
        bn_name: str,
        chain: bool,
    ) -> tuple[dict[str, list[str]], onnx.NodeProto, list[str]]:
        """Fold ``affine`` into one producer (with its Add, if any).

        Returns the new parameters, the node that now computes the tensor the producer's
        reader reads, and the names that may have died.
        """
        g, p = self.g, part.partner
        assert p is not None
        op = p.op_type
        w_name = p.input[1]
        old_bias: str | None = None
        addend: str | None = None
        if site_add := part.add:
            if op == "MatMul":
                old_bias = bias_input(site_add, p)
            else:  # Conv/ConvTranspose + Add(constant): the addend joins the layer's bias
                addend = bias_input(site_add, p)
        if old_bias is None and op != "MatMul" and len(p.input) > 2 and p.input[2]:
            old_bias = p.input[2]
        bias64 = None if old_bias is None else self._value64(old_bias)
        w64 = self._value64(w_name)
        if op in ("Conv", "ConvTranspose"):
            layout = foldmath.CONV if op == "Conv" else foldmath.CONV_TRANSPOSE
            bias_vec = _vector(bias64, affine.channels)
            if addend is not None:
                bias_vec = foldmath.add_to_bias(bias_vec, self._value64(addend), affine.channels)
            new_w, new_b = foldmath.fold_backward(
                w64, bias_vec, affine, layout.with_groups(attr_int(p, "group", 1))
            )
        elif op == "Gemm":
            new_w, new_b = foldmath.fold_gemm_backward(
                w64,
                bias64,
                affine,
                alpha=attr_float(p, "alpha", 1.0),
                beta=attr_float(p, "beta", 1.0),
                trans_b=bool(attr(p, "transB", 0)),
            )
            _set_float(p, "alpha", 1.0)
            _set_float(p, "beta", 1.0)
        else:  # MatMul, with or without an Add holding its bias
            bias_flat = None
            if bias64 is not None:
                bias_flat = np.broadcast_to(bias64, (affine.channels,))
            new_w, new_b = foldmath.fold_backward(w64, bias_flat, affine, foldmath.MATMUL)
        sources = [*bn_params, *self._sources(addend)] if addend else bn_params
        new_w_name, new_b_name = self._write_pair(
            bn_name, w_name, old_bias, new_w, new_b, sources, chain
        )
        gone = [w_name, *([old_bias] if old_bias else []), *([addend] if addend else [])]

        g.replace_input(p, w_name, new_w_name)
        out_node = p
        if part.add is not None and op == "MatMul":
            assert old_bias is not None  # set from the Add above
            g.replace_input(part.add, old_bias, new_b_name)
            out_node = part.add
        elif op == "MatMul":
            out_node = self._add_bias_after(p, new_b_name, bn_name)
        elif old_bias is not None:
            g.replace_input(p, old_bias, new_b_name)
        else:
            while len(p.input) < 2:
                p.input.append("")
            p.input.append(new_b_name)
            g.consumers[new_b_name].append(p)
        if part.add is not None and op != "MatMul":
            # The Add is now in the bias: the layer takes over the Add's output name.
            add = part.add
            inner, outer = p.output[0], add.output[0]
            g.remove_node(add)
            for i in add.input:
                g.consumers[i] = [n for n in g.consumers[i] if n is not add]
            g.set_output(p, 0, outer)
            for reader in g.users(inner):  # shape readers only; the sum has the same shape
                g.replace_input(reader, inner, outer)
        self._forget(w_name, old_bias)
        return (
            {new_w_name: self.origin[new_w_name], new_b_name: self.origin[new_b_name]},
            (out_node),
            gone,
        )

    def _forward(self, site: Site) -> FoldDecision:
        g, bn, q = self.g, site.bn, site.partner
        assert q is not None
        affine, bn_params = self._affine(bn)
        x, y = bn.input[0], bn.output[0]
        op = q.op_type
        w_name = q.input[1]
        old_bias = q.input[2] if len(q.input) > 2 and q.input[2] else None
        bias64 = None if old_bias is None else self._value64(old_bias)
        w64 = self._value64(w_name)
        if op == "Conv":
            layout = foldmath.CONV.with_groups(attr_int(q, "group", 1))
            new_b = _vector(bias64, w64.shape[0])
            new_w, new_b = foldmath.fold_forward(w64, new_b, affine, layout)
        elif op == "Gemm":
            new_w, new_b = foldmath.fold_gemm_forward(
                w64,
                bias64,
                affine,
                alpha=attr_float(q, "alpha", 1.0),
                beta=attr_float(q, "beta", 1.0),
                trans_b=bool(attr(q, "transB", 0)),
                repeat=site.repeat,
            )
            _set_float(q, "alpha", 1.0)
            _set_float(q, "beta", 1.0)
        else:
            new_w, new_b = foldmath.fold_forward(
                w64, None, affine, foldmath.MATMUL, repeat=site.repeat
            )
        out = q.output[0]
        # A chain continues when another BN reads the consumer's output (backward) or feeds
        # the BN folded now (forward, BN -> BN -> consumer).
        before = g.producer.get(x)
        chain = any(n.op_type == "BatchNormalization" for n in g.users(out)) or (
            before is not None and before.op_type == "BatchNormalization"
        )
        new_w_name, new_b_name = self._write_pair(
            site.name, w_name, old_bias, new_w, new_b, bn_params, chain
        )
        dead = [w_name, *bn.input[1:]] + ([old_bias] if old_bias else [])

        g.replace_input(q, w_name, new_w_name)
        if op == "MatMul":
            self._add_bias_after(q, new_b_name, site.name)
        elif old_bias is not None:
            g.replace_input(q, old_bias, new_b_name)
        else:
            q.input.append(new_b_name)
            g.consumers[new_b_name].append(q)
        if site.through:
            reader = site.through[0]
        else:
            reader = site.flatten if site.flatten is not None else q
        g.replace_input(reader, y, x)
        self._remove_bn(bn)
        g.remove_dead(dead)
        for shape_reader in g.users(y):  # shape/dtype readers only; x has y's shape and dtype
            g.replace_input(shape_reader, y, x)
        self._forget(w_name, old_bias)
        return FoldDecision.fold(
            site.name,
            Direction.FORWARD,
            site.facts.partner or op,
            params={new_w_name: self.origin[new_w_name], new_b_name: self.origin[new_b_name]},
            tensor=out,
        )

    def _forget(self, *names: str | None) -> None:
        """Drop float64 copies of parameters a fold has replaced."""
        for n in names:
            if n:
                self.exact.pop(n, None)


def _vector(bias: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A Conv bias as the 1-D vector the runtime reads.

    The dynamo exporter can write a bias-less Conv's zero bias with a wrong shape (e.g.
    ``(C, 2)`` for Conv3d); a uniform bias means the same whatever its shape, so it is read as
    ``channels`` copies of its value (discovery refuses non-uniform ones of the wrong size).
    """
    if bias is None or bias.shape == (channels,):
        return bias
    return np.full(channels, bias.reshape(-1)[0])


def _set_float(node: onnx.NodeProto, name: str, value: float) -> None:
    """Set a float attribute, adding it when absent."""
    for a in node.attribute:
        if a.name == name:
            a.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))
