"""The ONNX path: same statistics as the torch path, a new model, the input untouched."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError, RecalibrationError
from bnfold.models import build


@pytest.fixture(scope="module")
def exported():
    model, x = build("resnet-mini")
    prog = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=({0: "batch"},), optimize=False, verbose=False
    )
    return model, prog.model_proto


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, 3, 32, 32, generator=g) * 2 + 0.5 for n in (5, 3, 6)]


def test_onnx_statistics_equal_torch_statistics(exported):
    model, proto = exported
    original = copy.deepcopy(proto)
    r_onnx = bnfold.recalibrate(proto, _data(), progress=False)
    r_torch = bnfold.recalibrate(model, _data(), inplace=False, progress=False)
    assert proto == original  # the input ModelProto is not modified
    assert r_onnx.framework == "onnx" and r_onnx.passes == r_torch.passes
    inits = {t.name: numpy_helper.to_array(t) for t in r_onnx.model.graph.initializer}
    sd = r_torch.model.state_dict()
    names = [n.input[3] for n in r_onnx.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(names) == 9
    for name in names:
        var_name = name.replace("running_mean", "running_var")
        # identical float32 activations up to kernel rounding; float64 reduction is shared
        np.testing.assert_allclose(inits[name], sd[name].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inits[var_name], sd[var_name].numpy(), rtol=1e-5)
        assert inits[name].dtype == np.float32
    assert [b.level for b in r_onnx.bns] == [b.level for b in r_torch.bns]
    assert [b.elements for b in r_onnx.bns] == [b.elements for b in r_torch.bns]
    onnx.checker.check_model(r_onnx.model)


@pytest.mark.parametrize("bs", [3, 7])
def test_onnx_batch_mode_equals_torch_batch_mode(exported, bs):
    model, proto = exported
    x = torch.cat(_data())
    data = [x[i : i + bs] for i in range(0, x.shape[0], bs)]
    r_onnx = bnfold.recalibrate(proto, data, mode="batch", progress=False)
    r_torch = bnfold.recalibrate(model, data, mode="batch", inplace=False, progress=False)
    assert r_onnx.mode == "batch" and r_onnx.passes == 1
    assert [b.level for b in r_onnx.bns] == [1] * 9
    inits = {t.name: numpy_helper.to_array(t) for t in r_onnx.model.graph.initializer}
    sd = r_torch.model.state_dict()
    names = [n.input[3] for n in r_onnx.model.graph.node if n.op_type == "BatchNormalization"]
    for name in names:
        var_name = name.replace("running_mean", "running_var")
        np.testing.assert_allclose(inits[name], sd[name].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inits[var_name], sd[var_name].numpy(), rtol=1e-5)
    # batch statistics differ from population ones downstream: the modes are really distinct
    r_pop = bnfold.recalibrate(proto, data, progress=False)
    pop = {t.name: numpy_helper.to_array(t) for t in r_pop.model.graph.initializer}
    assert not np.allclose(pop[names[-1]], inits[names[-1]], rtol=1e-3)
    # the result keeps inference BNs (training_mode lives only in the probe copy)
    assert all(
        a.name != "training_mode" or a.i == 0 for n in r_onnx.model.graph.node for a in n.attribute
    )
    onnx.checker.check_model(r_onnx.model)


def _tiny_bn_model(opset: int = 15) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 2, 3])
    inits = [
        numpy_helper.from_array(np.ones(2, np.float32), "g"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b"),
        numpy_helper.from_array(np.zeros(2, np.float32), "m"),
        numpy_helper.from_array(np.ones(2, np.float32), "v"),
    ]
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn")
    graph = helper.make_graph([node], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_graph_input_bn_is_exact_and_unbiased(oracle, rel_err):
    g = np.random.default_rng(0)
    data = [g.normal(100.0, 0.01, size=(n, 2, 3)).astype(np.float32) for n in (4, 1, 7)]
    r = bnfold.recalibrate(_tiny_bn_model(), data, progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    mean, var = oracle(np.concatenate(data))
    assert rel_err(inits["m"], mean) <= 1e-7
    assert rel_err(inits["v"], var) <= 1e-6  # float32 storage of the exact value
    assert r.bns[0].elements == 12 * 3


def test_onnx_errors():
    with pytest.raises(RecalibrationError, match="no batch"):
        bnfold.recalibrate(_tiny_bn_model(), [], progress=False)
    old = _tiny_bn_model(opset=13)  # no training_mode before BatchNormalization-14
    with pytest.raises(BadInputError, match="opset 13"):
        bnfold.recalibrate(old, [np.zeros((2, 2, 3), np.float32)], mode="batch")
    bad = [np.full((2, 2, 3), np.nan, np.float32)]
    with pytest.raises(RecalibrationError, match="'bn'"):
        bnfold.recalibrate(_tiny_bn_model(), bad, progress=False)
    with pytest.raises(BadInputError, match="not model inputs"):
        bnfold.recalibrate(_tiny_bn_model(), [{"z": np.zeros((2, 2, 3), np.float32)}])


def test_onnx_population_mode_replays_a_generator(exported):
    _, proto = exported
    listed = bnfold.recalibrate(proto, _data(), data_cache_mb=0, progress=False)
    replayed = bnfold.recalibrate(proto, (b.numpy() for b in _data()), progress=False)
    assert replayed.passes == listed.passes > 1
    inits = {t.name: numpy_helper.to_array(t) for t in listed.model.graph.initializer}
    for t in replayed.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), inits[t.name])
    with pytest.raises(BadInputError, match="did not fit the replay cache"):
        bnfold.recalibrate(proto, iter(_data()), data_cache_mb=0, progress=False)


def test_onnx_without_batchnorm_hints_at_the_export():
    # what an exporter that folds BNs writes: a bare Conv
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 2, 4, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInputError, match="recalibrate the PyTorch model with bnfold"):
        bnfold.recalibrate(model, [np.zeros((1, 2, 4, 4), np.float32)], progress=False)
