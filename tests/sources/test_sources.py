"""Model sources: factories and their weights, shorthands, shape options, and refusals."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import bnfold
from bnfold.cli.app import app
from bnfold.cli.common import EXIT_BAD_INPUT
from bnfold.inputspec import example_inputs, parse_dims
from bnfold.models import build
from bnfold.sources import ModelSpec, load_source, parse_factory_args, read_state_dict

FACTORY = "bnfold.models.nets:resnet_mini"

USER_MODULE = textwrap.dedent(
    """
    import torch.nn as nn

    def build(num_classes=10, width=8):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
        )

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            self.b = nn.Linear(5, 4)

        def forward(self, image, features):
            return self.a(image).mean((2, 3)) + self.b(features)
    """
)


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the user's own module, as the current directory."""
    (tmp_path / "user_nets_src.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("user_nets_src", None)


def _trained_resnet_mini(tmp_path: Path) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    """The reference resnet-mini with randomised BN statistics, and its saved state_dict."""
    module, x = build("resnet-mini", seed=3)
    path = tmp_path / "weights.pt"
    torch.save(module.state_dict(), path)
    return module, x, path


def test_factory_args_are_literals_or_strings() -> None:
    args = parse_factory_args(["num_classes=10", "scale=0.5", "act=relu", "dims=(1, 2)", "x=None"])
    assert args == {"num_classes": 10, "scale": 0.5, "act": "relu", "dims": (1, 2), "x": None}
    with pytest.raises(bnfold.BadInputError, match="KEY=VALUE"):
        parse_factory_args(["10"])
    with pytest.raises(bnfold.BadInputError, match="twice"):
        parse_factory_args(["a=1", "a=2"])


def test_factory_and_weights_round_trip_through_export(tmp_path: Path) -> None:
    """A state_dict saved from a models/ net, loaded through its factory, exports to ONNX
    that computes what the original module computes."""
    module, x, weights = _trained_resnet_mini(tmp_path)
    out = tmp_path / "m.onnx"
    result = bnfold.export(
        FACTORY, out, weights=weights, input_shape=tuple(x.shape), progress=False
    )
    assert result.passed and out.exists() and result.batchnorms_left == 0
    with torch.no_grad():
        ref = module.double()(x.double()).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    # verify takes the same source as its reference
    res = CliRunner().invoke(app, ["verify", FACTORY, str(out), "--weights", str(weights), "-q"])
    assert res.exit_code == 0 and "PASS" in res.output, res.output
    res = CliRunner().invoke(app, ["verify", FACTORY, str(out), "-q"])  # fresh statistics
    assert res.exit_code == 1, res.output
    # without the weights the factory's fresh BN statistics give another function
    fresh = tmp_path / "fresh.onnx"
    bnfold.export(FACTORY, fresh, input_shape=tuple(x.shape), progress=False)
    sess = ort.InferenceSession(str(fresh), providers=["CPUExecutionProvider"])
    other = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(other - ref).max() > 1e-3 * max(1.0, np.abs(ref).max())


def test_safetensors_weights_and_checkpoint_wrappers_load_alike(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    module, x, weights = _trained_resnet_mini(tmp_path)
    st = tmp_path / "w.safetensors"
    save_file(module.state_dict(), str(st))
    wrapped = tmp_path / "ckpt.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}},
        wrapped,
    )
    with torch.no_grad():
        ref = module(x)
        for path in (weights, st, wrapped):
            model, inputs = bnfold.load_model(
                FACTORY, weights=str(path), input_shape=(2, 3, 32, 32)
            )
            assert inputs is not None and inputs[0].shape == (2, 3, 32, 32)
            assert torch.equal(model(x), ref), path


def test_weights_that_do_not_match_name_the_first_offenders(tmp_path: Path) -> None:
    module, _, _ = _trained_resnet_mini(tmp_path)
    state = module.state_dict()
    missing = dict(state)
    del missing["fc.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    extra = {**state, "head.extra": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pt")
    shape = {**state, "fc.weight": torch.zeros(5, state["fc.weight"].shape[1])}
    torch.save(shape, tmp_path / "shape.pt")
    cases = {
        "missing.pt": "1 missing keys (fc.weight)",
        "extra.pt": "unexpected keys (head.extra)",
        "shape.pt": "fc.weight (5, 32) vs (10, 32)",
    }
    for name, message in cases.items():
        with pytest.raises(bnfold.BadInputError, match=r"do not match") as info:
            load_source(ModelSpec(FACTORY, weights=str(tmp_path / name)))
        assert message in str(info.value) and "\n" not in str(info.value)


def test_a_pickled_module_is_not_taken_as_weights(tmp_path: Path) -> None:
    module, _, _ = _trained_resnet_mini(tmp_path)
    path = tmp_path / "whole.pt"
    torch.save(module, path)
    with pytest.raises(bnfold.BadInputError, match="weights_only"):
        read_state_dict(str(path))


def test_user_factory_with_args_and_several_named_inputs(user_dir: Path) -> None:
    loaded = load_source(ModelSpec("user_nets_src:build", factory_args={"num_classes": 3}))
    assert loaded.model[-1].out_features == 3 and loaded.label == "build"
    two = load_source(ModelSpec("user_nets_src:TwoInputs"))
    inputs = example_inputs(two, shapes=["features:2x5", "image:2x3x8x8"])
    assert [tuple(t.shape) for t in inputs] == [(2, 3, 8, 8), (2, 5)]  # forward's order
    with pytest.raises(bnfold.BadInputError, match="takes 2 inputs"):
        example_inputs(two, input_shape="2x3x8x8")
    with pytest.raises(bnfold.BadInputError, match="no --shape for input"):
        example_inputs(two, shapes=["image:2x3x8x8"])
    with pytest.raises(bnfold.BadInputError, match="unknown input"):
        example_inputs(two, shapes=["pixels:2x3x8x8", "features:2x5"])
    typed = example_inputs(loaded, input_shape="1x3x8x8", dtype="float64")
    assert typed[0].dtype == torch.float64


def test_dims_and_dtypes_are_checked() -> None:
    assert parse_dims("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("1x3xx4", "1x0x4", "", "axb"):
        with pytest.raises(bnfold.BadInputError):
            parse_dims(bad)
    with pytest.raises(bnfold.BadInputError, match="--dtype"):
        from bnfold.inputspec import parse_dtype

        parse_dtype("float8")


def test_timm_style_declared_input_size_is_the_default(user_dir: Path) -> None:
    (user_dir / "user_cfg_src.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Sequential):\n"
        "    pretrained_cfg = {'input_size': (3, 12, 12)}\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    loaded = load_source(ModelSpec("user_cfg_src:Net"))
    assert loaded.input_size == (3, 12, 12)
    (x,) = example_inputs(loaded)
    assert tuple(x.shape) == (1, 3, 12, 12)
    sys.modules.pop("user_cfg_src", None)


def test_dynamic_batch_is_symbolic_and_checked_at_two_sizes(tmp_path: Path) -> None:
    out = tmp_path / "d.onnx"
    result = bnfold.export(FACTORY, out, input_shape=(1, 3, 16, 16), progress=False)
    assert result.passed and result.verify_report.batches == 2
    dim0 = onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    static = tmp_path / "s.onnx"
    result = bnfold.export(
        FACTORY, static, input_shape=(1, 3, 16, 16), dynamic_batch=False, opset=18, progress=False
    )
    model = onnx.load(static)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}


def test_fp16_export_rounds_parameters_once_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "h.onnx"
    result = bnfold.export("resnet-mini", out, fp16=True, progress=False)
    assert result.passed, str(result.verify_report)
    model = onnx.load(out)
    floats = {t.data_type for t in model.graph.initializer} - {onnx.TensorProto.INT64}
    assert floats == {onnx.TensorProto.FLOAT16}
    (stats,) = result.verify_report.providers[0].outputs
    assert stats.dtype == "float16" and stats.floor is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_pkg.nets:build"], "cannot import 'no_such_pkg.nets'"),
        (["user_nets_src:nope", "--input-shape", "1x3x8x8"], "no factory 'nope'"),
        (["user_nets_src:build"], "--input-shape"),
        (["user_nets_src:build", "--input-shape", "1x3xx8"], "positive integers"),
        (["user_nets_src:build", "--input-shape", "1x3x8x8", "--shape", "x:1x3x8x8"], "not both"),
        (
            ["user_nets_src:build", "--input-shape", "1x3x8x8", "--weights", "bad.pt"],
            "do not match",
        ),
        (
            ["user_nets_src:build", "--factory-arg", "bogus=1", "--input-shape", "1x3x8x8"],
            "arguments",
        ),
        (["resnet-mini", "--weights", "bad.pt"], "do not match"),
        (["m.pt2", "--weights", "bad.pt"], "--weights applies to a factory"),
        (["torchvision:resnet18", "--factory-arg", "pretrained=True"], "never downloads"),
    ],
)
def test_cli_bad_sources_are_one_line_and_leave_nothing(
    user_dir: Path, args: list[str], message: str
) -> None:
    torch.save({"unrelated.weight": torch.zeros(2)}, user_dir / "bad.pt")
    (user_dir / "m.pt2").write_bytes(b"not a model")
    res = CliRunner().invoke(app, ["export", "-q", "-o", "out.onnx", *args])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (user_dir / "out.onnx").exists()
    assert not list(user_dir.glob(".out.onnx*"))


def test_cli_fold_and_recalibrate_take_a_factory_and_weights(tmp_path: Path) -> None:
    module, x, weights = _trained_resnet_mini(tmp_path)
    runner = CliRunner()
    folded = tmp_path / "f.pt2"
    res = runner.invoke(
        app,
        [
            "fold",
            FACTORY,
            "--weights",
            str(weights),
            "--input-shape",
            "2x3x32x32",
            "-o",
            str(folded),
        ],
    )
    assert res.exit_code == 0, res.output
    program = torch.export.load(str(folded))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), module(x), rtol=1e-4, atol=1e-5)
    res = runner.invoke(
        app, ["fold", FACTORY, "--weights", str(weights), "-o", str(tmp_path / "g.pt2")]
    )
    assert res.exit_code == EXIT_BAD_INPUT and "--input-shape" in res.output
    assert not (tmp_path / "g.pt2").exists()
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    recal = tmp_path / "recal.pt"
    res = runner.invoke(
        app,
        [
            "recalibrate",
            FACTORY,
            "--weights",
            str(weights),
            "--data",
            str(data),
            "-o",
            str(recal),
            "--no-progress",
            "--batch-size",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    # the written state_dict is again usable as --weights for the same factory
    model, _ = bnfold.load_model(FACTORY, weights=str(recal))
    key = next(k for k in module.state_dict() if k.endswith("running_var"))
    assert not torch.equal(model.state_dict()[key], module.state_dict()[key])


def test_cli_export_reports_an_exporter_problem_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the unfolded export is itself far off, the exit code is 4 (not 1: the fold is not
    to blame), the JSON says why, and no model is written."""
    import bnfold.verification.floor as floor

    monkeypatch.setattr(floor, "EXPORTER_FAR_OFF", 0.0)  # any floor above 0 is "far off"
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["export", "mlp", "-o", str(out), "--json", str(rep), "-q"])
    assert res.exit_code == 4, res.output
    assert "exporter" in res.output and not out.exists()
    data = json.loads(rep.read_text())
    assert data["exporter_problem"] is True and data["passed"] is False
    assert data["verify"]["exporter_problems"]  # provider/output pairs


def test_pt2_sources_verify_at_the_sizes_their_exports_run(tmp_path: Path) -> None:
    """A static .pt2 keeps its fixed batch (one size checked); a dynamic one is checked at a
    second size unless the plain export of the loaded program cannot run there, which the
    notes say."""
    module, x = build("resnet-mini")
    static, dynamic = tmp_path / "static.pt2", tmp_path / "dyn.pt2"
    torch.export.save(torch.export.export(module, (x,)), static)
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(module, (x,), dynamic_shapes=({0: batch},)), dynamic)
    result = bnfold.export(static, tmp_path / "s.onnx", progress=False)
    assert result.passed and result.verify_report.batches == 1
    result = bnfold.export(dynamic, tmp_path / "d.onnx", progress=False)
    assert result.passed and (tmp_path / "d.onnx").exists()
    checked = result.verify_report.batches
    assert checked == 2 or any("verified at batch 2 only" in n for n in result.notes)
