"""Fixtures for the optimizer tests."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_optional_warnings():
    # bitsandbytes warns that paging falls back on CPU; torchao warns about compile caching.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
