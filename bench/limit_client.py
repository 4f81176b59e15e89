"""Baseline (a) of the pull benchmark: the limit. A bare concurrent httpx script making the bridge's requests.

It sends what ``fhir-bridge pull`` sends, in the same order of dependence and with the same concurrency (one
pooled ``httpx.AsyncClient``, one semaphore of ``--concurrency`` requests in flight, like
``SourceClient``): the Patient search; the DocumentReference and ImagingStudy searches at the same time, each
following its next links; any Endpoint the source did not include; then every attachment the bridge would
retrieve (current, not masked), streamed and thrown away. Nothing else: no validation, no hashing, no writing,
no packaging. What is left is the network and the source, so the bridge can only approach this figure.

Run as ``python -m bench.limit_client --source URL --patient SYSTEM|VALUE``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

_NEVER_FORWARD = "MASQUE_PS"


async def _json(http: httpx.AsyncClient, slots: asyncio.Semaphore, url: str,
                params: dict[str, str] | None = None) -> dict[str, Any]:
    async with slots:
        response = await http.get(url, params=params, headers={"Accept": "application/fhir+json"})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def _search(http: httpx.AsyncClient, slots: asyncio.Semaphore, url: str,
                  params: dict[str, str]) -> list[dict[str, Any]]:
    """Every entry of every page, following ``next`` (as the bridge does: one page after the other)."""
    entries: list[dict[str, Any]] = []
    page = await _json(http, slots, url, params)
    while True:
        entries.extend(page.get("entry", []) or [])
        next_url = next((link["url"] for link in page.get("link", []) if link.get("relation") == "next"), None)
        if not next_url:
            return entries
        page = await _json(http, slots, next_url)


async def _drain(http: httpx.AsyncClient, slots: asyncio.Semaphore, url: str) -> int:
    async with slots, http.stream("GET", url, headers={"Accept": "*/*"}) as response:
        response.raise_for_status()
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
        return size


def _masked(doc: dict[str, Any]) -> bool:
    labels = [*(doc.get("meta", {}).get("security", []) or []), *(doc.get("securityLabel", []) or [])]
    return any(_NEVER_FORWARD in json.dumps(label) for label in labels)


async def pull(base: str, patient: str, concurrency: int, page_size: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        count = str(page_size)
        found = await _search(http, slots, f"{base}/Patient", {"_count": count, "identifier": patient})
        patient_id = found[0]["resource"]["id"]
        docs, studies = await asyncio.gather(
            _search(http, slots, f"{base}/DocumentReference",
                    {"_count": count, "patient": patient_id, "status": "current"}),
            _search(http, slots, f"{base}/ImagingStudy",
                    {"_count": count, "patient": patient_id, "_include": "ImagingStudy:endpoint"}),
        )
        included = {e["resource"]["id"] for e in studies if e["resource"]["resourceType"] == "Endpoint"}
        wanted = {ref["reference"] for e in studies if e["resource"]["resourceType"] == "ImagingStudy"
                  for ref in e["resource"].get("endpoint", [])}
        missing = sorted(r for r in wanted if r.rsplit("/", 1)[-1] not in included)
        await asyncio.gather(*(_json(http, slots, f"{base}/{ref}") for ref in missing))
        urls = [e["resource"]["content"][0]["attachment"]["url"] for e in docs if not _masked(e["resource"])]
        urls = [u if u.startswith("http") else f"{base}/{u}" for u in urls]
        sizes = await asyncio.gather(*(_drain(http, slots, url) for url in urls))
    kept_studies = sum(1 for e in studies if e["resource"]["resourceType"] == "ImagingStudy")
    return {"documents": len(urls), "studies": kept_studies, "bytes": sum(sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True)
    parser.add_argument("--patient", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=100, help="_count of the first page (source.page_size)")
    args = parser.parse_args()
    started = time.perf_counter()
    summary = asyncio.run(pull(args.source.rstrip("/"), args.patient, args.concurrency, args.page_size))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
