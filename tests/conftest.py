from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


def job_body(name: str) -> bytes:
    return (FIXTURES / "jobs" / name).read_bytes()
