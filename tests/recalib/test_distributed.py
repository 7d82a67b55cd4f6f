"""Two gloo ranks on CPU with uneven shards end bit-identical and equal to one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnfold


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    ).eval()


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    offsets = torch.randn(23, 3, 1, 1, generator=g) * 4
    return offsets + torch.randn(23, 3, 6, 6, generator=g)


# uneven shards: rank 0 gets 17 samples in batches of 4, rank 1 gets 6 samples in batches of 5
_SHARDS = [(0, 17, 4), (17, 23, 5)]


def _onnx_model() -> bytes:
    model = _model()
    prog = torch.onnx.export(
        model,
        (_data()[:2],),
        dynamo=True,
        dynamic_shapes=({0: "batch"},),
        optimize=False,
        verbose=False,
    )
    return prog.model_proto.SerializeToString()


def _onnx_worker(rank: int, init: str, out: str, blob: bytes) -> None:
    import onnx
    from onnx import numpy_helper

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x = _data().numpy()
        lo, hi, bs = _SHARDS[rank]
        shard = [x[i : min(i + bs, hi)] for i in range(lo, hi, bs)]
        report = bnfold.recalibrate(onnx.load_from_string(blob), shard, progress=False)
        assert report.world_size == 2
        stats = {
            t.name: numpy_helper.to_array(t)
            for t in report.model.graph.initializer
            if "running" in t.name
        }
        torch.save(stats, os.path.join(out, f"onnx{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _worker(rank: int, init: str, out: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x = _data()
        lo, hi, bs = _SHARDS[rank]
        shard = [x[i : min(i + bs, hi)] for i in range(lo, hi, bs)]
        model = _model()
        report = bnfold.recalibrate(model, shard, mode=mode, progress=False)
        assert report.world_size == 2
        state = {k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, mode: str) -> None:
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_worker, args=(init, str(tmp_path), mode), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    single = _model()
    bnfold.recalibrate(
        single, [_data()[i : i + 3] for i in range(0, 23, 3)], mode=mode, progress=False
    )
    want = single.state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ on {k}"
        if "running" in k:
            torch.testing.assert_close(r0[k], want[k], rtol=1e-6, atol=1e-7)
    # every batch of both ranks was counted
    assert int(r0["1.num_batches_tracked"]) == 5 + 2


@pytest.mark.slow
def test_two_gloo_ranks_quick(tmp_path):
    _run(tmp_path, "population")


@pytest.mark.slow
def test_two_gloo_ranks_onnx_quick(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    blob = _onnx_model()
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_onnx_worker, args=(init, str(tmp_path), blob), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "onnx0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "onnx1.pt", weights_only=False)
    single = bnfold.recalibrate(
        onnx.load_from_string(blob),
        [_data().numpy()[i : i + 3] for i in range(0, 23, 3)],
        progress=False,
    )
    want = {t.name: numpy_helper.to_array(t) for t in single.model.graph.initializer}
    assert len(r0) == 6  # three BNs, mean and var each
    for k in r0:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"ranks differ on {k}")
        np.testing.assert_allclose(r0[k], want[k], rtol=1e-6, atol=1e-7)
