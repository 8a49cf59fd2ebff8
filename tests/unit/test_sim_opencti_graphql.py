"""The simulated platform without a broker: document analysis, the older-schema knob, and the
optional packages (cryptography, PyJWT) imported only when needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.opencti.graphql import (
    SelectedField,
    classify_query,
    missing_field_errors,
    selected_fields,
)

ROOT = Path(__file__).resolve().parents[2]


def names(query: str) -> list[str]:
    return [f.name for f in selected_fields(query)]


def test_selected_fields_skip_arguments_aliases_fragments_and_directives() -> None:
    query = '''
    # a comment { jwks }
    mutation RegisterConnector($input: RegisterConnectorInput = {name: "x) { jwks }"}) {
      reg: registerConnector(input: $input) {
        id
        ...ConnectorBits @include(if: true)
        ... on Connector { connector_state(format: """) { jwks } \\""" (""") }
        config { listen @skip(if: false) }
      }
    }
    fragment ConnectorBits on Connector { jwks }
    '''
    assert names(query) == [
        "registerConnector",
        "id",
        "connector_state",
        "config",
        "listen",
        "jwks",
    ]


def test_selected_fields_locations_are_one_based() -> None:
    query = "query {\n  about {\n    version\n  }\n}"
    assert selected_fields(query) == (
        SelectedField("about", 2, 3),
        SelectedField("version", 3, 5),
    )


def test_missing_field_errors_one_per_occurrence() -> None:
    query = "query { connectorsForWorker { id jwks config { listen } } connector { jwks } }"
    errors = missing_field_errors(query, {"Connector.jwks"})
    assert errors == [
        {
            "message": 'Cannot query field "jwks" on type "Connector".',
            "locations": [{"line": 1, "column": column}],
            "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"},
        }
        for column in (34, 71)
    ]
    assert missing_field_errors(query, {"Connector.connector_info"}) == []
    # classification is unchanged by the selection analysis
    assert classify_query(query)[0] == "GetConnectors"


def test_missing_fields_are_schema_coordinates() -> None:
    assert PlatformSimConfig(missing_fields=frozenset({"Connector.jwks"})).missing_fields
    with pytest.raises(ValueError, match=r"Type\.field"):
        PlatformSimConfig(missing_fields=frozenset({"jwks"}))


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_needs_neither_pyjwt_nor_cryptography() -> None:
    out = run_python(
        """
        import sys
        import lis_async.sim.opencti
        print(sorted(m for m in ("jwt", "cryptography") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_without_cryptography_only_jwks_answers_fail() -> None:
    """Registration without ``jwks`` works when the packages are absent; with it, the sim
    answers UNKNOWN_ERROR naming the package and records no connector."""
    out = run_python(
        """
        import asyncio, json, sys
        sys.modules["jwt"] = None
        sys.modules["cryptography"] = None
        import aiohttp
        from lis_async.sim.opencti import PlatformSim, PlatformSimConfig, SimDependencyError

        Q = "mutation R($input: RegisterConnectorInput) { registerConnector(input: $input) { id %s } }"
        INPUT = {"input": {"id": "c1", "name": "n", "type": "INTERNAL_ENRICHMENT"}}

        async def main():
            sim = PlatformSim(PlatformSimConfig(amqp_url=None))
            await sim.start()
            headers = {"Authorization": "Bearer " + sim.config.token}
            async with aiohttp.ClientSession(headers=headers) as http:
                for extra, cid in (("jwks", "c0"), ("connector_state", "c1")):
                    variables = {"input": dict(INPUT["input"], id=cid)}
                    payload = {"query": Q % extra, "variables": variables}
                    async with http.post(sim.graphql_url, json=payload) as r:
                        print(json.dumps(await r.json()))
            print(sorted(sim.connectors))
            try:
                sim.connector_jwt()
            except SimDependencyError as exc:
                print("jwt:", exc)
            await sim.close()

        asyncio.run(main())
        """
    )
    with_jwks, without, connectors, jwt_line = out.strip().splitlines()
    assert '"UNKNOWN_ERROR"' in with_jwks and "'cryptography' package" in with_jwks
    assert '"registerConnector": {"id": "c1"' in without and "jwks" not in without
    assert connectors == "['c1']"
    assert jwt_line == "jwt: PlatformSim.connector_jwt() needs the 'PyJWT' package"
