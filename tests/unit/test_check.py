"""``lis-async check`` prints the URLs it tries, with their credentials masked."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from lis_async.check import run_check
from lis_async.settings.model import load_settings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the test connects


async def test_check_masks_credentials_in_the_urls_it_prints(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lis_async")
    octi, lis = closed_port(), closed_port()
    settings = load_settings(
        env={
            "OPENCTI_URL": f"http://octi-user:octi-pass@127.0.0.1:{octi}",
            "OPENCTI_TOKEN": "token-0123",
            "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
            "CONFIG_LIS_APIKEY_CTI": "key-0123",
            "LASTINFOSEC_BASE_URL": f"http://lis-user:lis-pass@127.0.0.1:{lis}/v2",
            "LASTINFOSEC_ALLOW_HTTP": "true",
            "LASTINFOSEC_BACKOFF_BASE_S": "0.01",
        }
    )
    lines: list[str] = []
    assert await run_check(settings, out=lines.append) == 1
    text = "\n".join(lines)
    assert f"FAIL opencti: http://***@127.0.0.1:{octi}: " in text
    assert f"FAIL lastinfosec: http://***@127.0.0.1:{lis}/v2: " in text
    everything = text + caplog.text
    assert "***@127.0.0.1" in caplog.text  # the request was logged, masked
    for secret in ("octi-user", "octi-pass", "lis-user", "lis-pass", "key-0123", "token-0123"):
        assert secret not in everything, secret


def test_check_names_removed_settings_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A removed setting (lis_async/settings/removed.py) is a WARN line, not a failure."""
    from lis_async.cli import main

    monkeypatch.chdir(tmp_path)  # no ./config.yml
    env = {
        "OPENCTI_URL": f"http://127.0.0.1:{closed_port()}",
        "OPENCTI_TOKEN": "token-0123",
        "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
        "CONFIG_LIS_APIKEY_CTI": "key-0123",
        "LASTINFOSEC_BASE_URL": f"http://127.0.0.1:{closed_port()}/v2",
        "LASTINFOSEC_ALLOW_HTTP": "true",
        "LASTINFOSEC_BACKOFF_BASE_S": "0.01",
        "LASTINFOSEC_RETRIES": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check"]) == 1  # nothing answers
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "PASS settings",
        "WARN settings: LASTINFOSEC_RETRIES (lastinfosec.retries) is no longer a setting and "
        "is ignored: transient failures are retried by time, for LASTINFOSEC_RETRY_BUDGET_S",
    ]
