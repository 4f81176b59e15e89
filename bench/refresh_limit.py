"""The limit of a refresh (part 4): one ITI-67 search per open case for what changed since it was opened.

``DocumentReference?patient=<id>&status=current&_lastUpdated=gt<since>`` per patient, ``--concurrency``
searches in flight (the bridge's ``source.concurrency``), pages followed, nothing else: no store, no audit,
no re-pull. A refresh that asks the source no more than one search per case cannot be faster than this.

``python -m bench.refresh_limit --source URL --patients FILE --since INSTANT``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx


async def refresh(base: str, patients: list[str], since: str, concurrency: int) -> dict[str, Any]:
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    changed = 0
    async with httpx.AsyncClient(limits=limits, timeout=120, headers={"Accept": "application/fhir+json"}) as http:
        async def search(patient: str) -> None:
            nonlocal changed
            url: str | None = f"{base}/DocumentReference"
            params: dict[str, str] | None = {"patient": patient, "status": "current", "_lastUpdated": f"gt{since}"}
            found = 0
            while url:
                async with slots:
                    page = (await http.get(url, params=params)).raise_for_status().json()
                found += len(page.get("entry", []) or [])
                url = next((link["url"] for link in page.get("link", []) if link.get("relation") == "next"), None)
                params = None
            changed += bool(found)

        await asyncio.gather(*(search(p) for p in patients))
    return {"cases": len(patients), "changed": changed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True)
    parser.add_argument("--patients", required=True, type=Path, help="JSON list of patient ids")
    parser.add_argument("--since", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    patients = json.loads(args.patients.read_text("utf-8"))
    started = time.perf_counter()
    summary = asyncio.run(refresh(args.source.rstrip("/"), patients, args.since, args.concurrency))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
