from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FIXTURES


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
