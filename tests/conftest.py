"""Shared test configuration."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests run with a fixed budget so the default suite stays fast on 2 cores;
# HYPOTHESIS_PROFILE=thorough runs many more examples.
settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seeded_rngs() -> None:
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
