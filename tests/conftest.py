"""Shared pytest setup: CPU JAX unless told otherwise, smoke sizes, and a Hypothesis profile without deadlines
(the first call of a jitted function compiles, which would trip Hypothesis' default 200 ms deadline)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KASCADE_SMOKE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("kascade", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("kascade")


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator per test."""
    return np.random.default_rng(0)
