"""The classic LastInfoSec enrichment connector, built the way the upstream one is.

pycti's :class:`OpenCTIConnectorHelper` + ``helper.listen(process_message)``: one job at a time
(pika, ``prefetch_count=1``), a blocking ``requests.get`` to LastInfoSec
(``{base}/stix21/search_hash/{hash}`` or ``{base}/stix21/search_host/{host}``, ``api_key`` in the
query string), then ``helper.send_stix2_bundle`` of the first returned bundle plus the enriched
observable. pycti acks each job before processing, reads the entity over GraphQL, reports
``toReceived`` / ``addExpectations`` / ``toProcessed`` and splits the bundle itself.

Differences from upstream, all in the classic connector's favour: no extra GraphQL calls to
create and attach an external reference, one pooled ``requests.Session``.

Configuration comes from the environment only (``OPENCTI_URL``, ``OPENCTI_TOKEN``,
``CONNECTOR_ID``, ``CONNECTOR_TYPE=INTERNAL_ENRICHMENT``, ``CONNECTOR_NAME``, ``CONNECTOR_SCOPE``,
``CONNECTOR_LOG_LEVEL``, ``CONFIG_LIS_APIKEY_CTI``, ``LASTINFOSEC_BASE_URL``).

Run: ``python -m lis_async.bench.classic``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from pycti import OpenCTIConnectorHelper

DEFAULT_BASE_URL = "https://api.client.lastinfosec.com/v2"
HASH_PREFERENCE = ("SHA-256", "SHA-1", "MD5")


class ClassicLastInfoSec:
    def __init__(self) -> None:
        self.helper = OpenCTIConnectorHelper({})
        self.api_url = os.environ.get("LASTINFOSEC_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
        self.api_key = os.environ.get("CONFIG_LIS_APIKEY_CTI", "")
        proxies: dict[str, str] = {}
        if os.environ.get("PROXY_HTTP"):
            proxies["http"] = os.environ["PROXY_HTTP"]
        if os.environ.get("PROXY_HTTPS"):
            proxies["https"] = os.environ["PROXY_HTTPS"]
        self.session = requests.Session()
        self.session.proxies.update(proxies)

    def _url(self, observable: dict[str, Any]) -> tuple[str, str] | None:
        entity_type = observable.get("entity_type")
        if entity_type == "StixFile":
            hashes = {h["algorithm"]: h["hash"] for h in observable.get("hashes") or []}
            digest = next((hashes[a] for a in HASH_PREFERENCE if hashes.get(a)), None)
            if digest is None:
                return None
            return f"{self.api_url}/stix21/search_hash/{quote(digest, safe='')}", digest
        value = str(observable.get("observable_value") or "")
        if entity_type == "Url":
            value = urlsplit(value if "://" in value else "http://" + value).hostname or ""
        if not value:
            return None
        return f"{self.api_url}/stix21/search_host/{quote(value, safe='')}", value

    def process_message(self, data: dict[str, Any]) -> str:
        observable = data["enrichment_entity"]
        target = self._url(observable)
        if target is None:
            return "Nothing to look up"
        url, value = target
        response = self.session.get(
            url, params={"api_key": self.api_key, "platform": "opencti"}, timeout=30
        )
        if response.status_code == 422:
            return f"{value} not found..."
        response.raise_for_status()
        message = response.json().get("message")
        if not isinstance(message, list) or not message:
            return f"No knowledge for {value}"
        bundle = dict(message[0])
        bundle["objects"] = [*bundle.get("objects", []), data["stix_entity"]]
        sent = self.helper.send_stix2_bundle(json.dumps(bundle), update=True)
        return f"Sent {len(sent)} stix bundle(s) for worker import"

    def start(self) -> None:
        self.helper.listen(message_callback=self.process_message)


def main() -> int:
    ClassicLastInfoSec().start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
