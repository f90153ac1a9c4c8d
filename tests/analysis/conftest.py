"""Fixtures of the analysis tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.analysis.synthetic import collapsed_fine_features, separated_fine_features


@pytest.fixture
def separated() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return separated_fine_features(60)


@pytest.fixture
def collapsed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return collapsed_fine_features(60)
