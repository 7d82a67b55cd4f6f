"""Folded parameters are the float64 result rounded once, element for element."""

from __future__ import annotations

import numpy as np
import pytest
from onnxfold_util import bn_inputs, bn_params, initializer, model

from bnfold.onnxfold import fold_onnx

TYPES = {np.float32: "float", np.float16: "float16"}


def _reference(w, b, p, eps, order):
    """Direct float64 evaluation of the fold of a chain of BNs, independent of foldmath."""
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    for name in order:
        s = p[f"{name}_scale"].astype(np.float64) / np.sqrt(
            p[f"{name}_var"].astype(np.float64) + np.float64(np.float32(eps))
        )
        t = p[f"{name}_b"].astype(np.float64) - p[f"{name}_mean"].astype(np.float64) * s
        w64 = w64 * s[:, None, None, None]
        b64 = b64 * s + t
    return w64, b64


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chain", [1, 2])
def test_backward_rounded_once(dtype, chain):
    rng = np.random.default_rng(11)
    c = 64
    w = (rng.standard_normal((c, 8, 3, 3)) * 0.5).astype(dtype)
    b = (rng.standard_normal(c) * 0.5).astype(dtype)
    p: dict[str, np.ndarray] = {}
    order = [f"bn{k}" for k in range(chain)]
    for name in order:
        p |= bn_params(name, c, rng, dtype=np.float32)
    t = TYPES[dtype]
    body, prev = [], "h"
    for k, name in enumerate(order):
        out = "y" if k == chain - 1 else f"z{k}"
        body.append(f"{out} = BatchNormalization<epsilon = 0.001>({prev}, {bn_inputs(name)})")
        prev = out
    lines = "\n".join(body)
    m = model(
        f"""g ({t}[N,8,5,5] x) => ({t}[N,{c},3,3] y) {{
            h = Conv(x, w, b)
            {lines}
        }}""",
        {"w": w, "b": b, **p},
    )
    folded, report = fold_onnx(m)
    assert all(d.folded for d in report.decisions)
    last = report.decisions[-1]
    new_w, new_b = list(last.params)
    w64, b64 = _reference(w, b, p, 0.001, order)
    got_w, got_b = initializer(folded, new_w), initializer(folded, new_b)
    assert got_w.dtype == dtype and got_b.dtype == dtype
    np.testing.assert_array_equal(got_w, w64.astype(dtype))
    np.testing.assert_array_equal(got_b, b64.astype(dtype))
    assert last.params[new_w][0] == "w"  # traceable to the original weight


def test_forward_rounded_once():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((16, 32)) * 0.5).astype(np.float16)
    c = (rng.standard_normal(16) * 0.5).astype(np.float16)
    p = bn_params("bn", 32, rng)
    m = model(
        f"""g (float16[N,32] x) => (float16[N,16] y) {{
            r = Relu(x)
            z = BatchNormalization(r, {bn_inputs("bn")})
            y = Gemm<transB = 1>(z, w, c)
        }}""",
        {"w": w, "c": c, **p},
    )
    folded, report = fold_onnx(m)
    new_w, new_c = list(report.decisions[0].params)
    s = p["bn_scale"].astype(np.float64) / np.sqrt(
        p["bn_var"].astype(np.float64) + np.float64(np.float32(1e-5))
    )
    t = p["bn_b"].astype(np.float64) - p["bn_mean"].astype(np.float64) * s
    w64 = w.astype(np.float64)
    np.testing.assert_array_equal(initializer(folded, new_w), (w64 * s).astype(np.float16))
    np.testing.assert_array_equal(
        initializer(folded, new_c), (c.astype(np.float64) + w64 @ t).astype(np.float16)
    )
