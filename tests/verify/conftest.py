"""Fixtures of the verification tests: a Conv -> BN chain and its fold by bnfold.fold."""

from __future__ import annotations

import onnx
import pytest
from verify_models import conv_bn_chain

import bnfold
from bnfold.report import FoldReport


@pytest.fixture
def chain() -> onnx.ModelProto:
    return conv_bn_chain()


@pytest.fixture
def folded_chain(chain: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    folded, report = bnfold.fold(chain)
    assert len(report.folded) == 4
    return folded, report
