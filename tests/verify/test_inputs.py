"""Input generation and real-data loading for verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnfold.errors import BadInputError
from bnfold.verification.inputs import (
    InputSpec,
    generate_batches,
    load_batches,
    parse_shape,
    parse_shapes,
    resolve_shape,
)

IMG = InputSpec("input", np.dtype(np.float32), ("batch", 3, 4, 4))


def test_parse_shape():
    assert parse_shape("input:8x3x224x224") == ("input", (8, 3, 224, 224))
    assert parse_shape("ns:x:2X3") == ("ns:x", (2, 3))
    for bad in ("input", "input:", ":2x3", "input:2xx3", "input:2x-1", "input:0x3"):
        with pytest.raises(BadInputError, match="--shape"):
            parse_shape(bad)
    with pytest.raises(BadInputError, match="twice"):
        parse_shapes(["a:1", "a:2"])


def test_symbolic_dims():
    assert resolve_shape(IMG, None) == (1, 3, 4, 4)  # leading symbolic dim defaults to 1
    assert resolve_shape(IMG, (6, 3, 4, 4)) == (6, 3, 4, 4)
    seq = InputSpec("tokens", np.dtype(np.int64), ("batch", "seq"))
    with pytest.raises(BadInputError, match=r"'seq' at axis 1.*--shape tokens:NxN"):
        resolve_shape(seq, None)
    unnamed = InputSpec("x", np.dtype(np.float32), (2, None))
    with pytest.raises(BadInputError, match="dim 1"):
        resolve_shape(unnamed, None)
    with pytest.raises(BadInputError, match="rank"):
        resolve_shape(IMG, (1, 3, 4))


def test_generated_batches_are_seeded_and_typed():
    specs = [
        IMG,
        InputSpec("half", np.dtype(np.float16), (2, 5)),
        InputSpec("ids", np.dtype(np.int64), (2, 7)),
        InputSpec("mask", np.dtype(np.bool_), (2, 7)),
    ]
    a = generate_batches(specs, {"input": (2, 3, 4, 4)}, seed=5, num_batches=2)
    b = generate_batches(specs, {"input": (2, 3, 4, 4)}, seed=5, num_batches=2)
    c = generate_batches(specs, {"input": (2, 3, 4, 4)}, seed=6, num_batches=2)
    assert len(a) == 2
    for name in ("input", "half", "ids", "mask"):
        assert np.array_equal(a[0][name], b[0][name])
    assert not np.array_equal(a[0]["input"], c[0]["input"])
    assert not np.array_equal(a[0]["input"], a[1]["input"])
    assert a[0]["input"].shape == (2, 3, 4, 4) and a[0]["input"].dtype == np.float32
    assert a[0]["half"].dtype == np.float16
    assert a[0]["ids"].dtype == np.int64 and a[0]["ids"].min() >= 0 and a[0]["ids"].max() < 4
    assert a[0]["mask"].dtype == np.bool_ and a[0]["mask"].any() and not a[0]["mask"].all()
    with pytest.raises(BadInputError, match="at least 1"):
        generate_batches(specs, num_batches=0)


def test_npy_single_and_stacked(tmp_path):
    one = np.ones((2, 3, 4, 4), np.float64)
    np.save(tmp_path / "one.npy", one)
    (batch,) = list(load_batches(tmp_path / "one.npy", [IMG]))
    assert batch["input"].dtype == np.float32  # cast to the model's float dtype
    stacked = np.arange(3 * 2 * 3 * 4 * 4, dtype=np.float32).reshape(3, 2, 3, 4, 4)
    np.save(tmp_path / "three.npy", stacked)
    batches = list(load_batches(str(tmp_path / "three.npy"), [IMG]))
    assert len(batches) == 3 and np.array_equal(batches[2]["input"], stacked[2])
    assert len(list(load_batches(tmp_path / "three.npy", [IMG], num_batches=2))) == 2


def test_npz_by_name_and_by_position(tmp_path):
    specs = [InputSpec("a", np.dtype(np.float32), (2,)), InputSpec("b", np.dtype(np.int64), (3,))]
    np.savez(tmp_path / "named.npz", b=np.arange(3), a=np.ones(2, np.float32))
    (batch,) = list(load_batches(tmp_path / "named.npz", specs))
    assert batch["b"].tolist() == [0, 1, 2]
    np.savez(tmp_path / "pos.npz", np.ones(2, np.float32), np.arange(3))
    (batch,) = list(load_batches(tmp_path / "pos.npz", specs))
    assert batch["a"].tolist() == [1.0, 1.0]
    np.savez(tmp_path / "missing.npz", a=np.ones(2))
    with pytest.raises(BadInputError, match="no data for input"):
        list(load_batches(tmp_path / "missing.npz", specs))


def test_bad_files(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        list(load_batches(tmp_path / "nope.npy", [IMG]))
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(BadInputError, match=r"\.npy or \.npz"):
        list(load_batches(tmp_path / "x.txt", [IMG]))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(BadInputError, match="cannot read data file"):
        list(load_batches(tmp_path / "bad.npy", [IMG]))
    two = [IMG, InputSpec("b", np.dtype(np.float32), (1,))]
    np.save(tmp_path / "one.npy", np.ones((1, 3, 4, 4)))
    with pytest.raises(BadInputError, match="single-input"):
        list(load_batches(tmp_path / "one.npy", two))


def test_loader_pairs_and_checks():
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3, 4, 4), torch.arange(6))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batches = list(load_batches(loader, [IMG]))  # (x, label): the label is not an input
    assert len(batches) == 3 and batches[0]["input"].shape == (2, 3, 4, 4)
    with pytest.raises(BadInputError, match="rank"):
        list(load_batches([np.ones((3, 4, 4), np.float32)], [IMG]))
    with pytest.raises(BadInputError, match="fixes it to 3"):
        list(load_batches([np.ones((1, 2, 4, 4), np.float32)], [IMG]))
    ints = InputSpec("ids", np.dtype(np.int64), (2,))
    with pytest.raises(BadInputError, match="expects int64"):
        list(load_batches([np.ones(2, np.float32)], [ints]))
    with pytest.raises(BadInputError, match="no batches"):
        list(load_batches([], [IMG]))
    with pytest.raises(BadInputError, match="not usable"):
        list(load_batches(42, [IMG]))
