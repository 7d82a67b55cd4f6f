"""Fixtures of the verification tests: a Conv -> BN chain and its correct fold."""

from __future__ import annotations

import onnx
import pytest
from verify_models import conv_bn_chain, hand_fold

from bnfold.report import FoldReport


@pytest.fixture
def chain() -> onnx.ModelProto:
    return conv_bn_chain()


@pytest.fixture
def folded_chain(chain: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    return hand_fold(chain)
