"""Baseline (b) of the pull benchmark: the naive way. A sequential loop over a FHIR client (fhirpy).

What a user writes without the bridge: ``SyncFHIRClient`` searches (fhirpy follows the next links itself),
then each attachment fetched one after the other with ``requests`` and saved to a file. One request at a
time, no connection reuse (fhirpy's sync client opens a connection per call, and so does ``requests.get``),
no hashing or packaging. It fetches the same data as the bridge: the Patient, the current DocumentReferences,
the ImagingStudies with their Endpoints, and the bytes of every document that is not masked.

Run as ``python -m bench.sequential_client --source URL --patient SYSTEM|VALUE --out DIR``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import requests
from fhirpy import SyncFHIRClient


def pull(base: str, patient: str, out: Path) -> dict[str, Any]:
    client = SyncFHIRClient(base)
    found = client.resources("Patient").search(identifier=patient).fetch_all()
    patient_id = found[0]["id"]
    docs = client.resources("DocumentReference").search(patient=patient_id, status="current").fetch_all()
    studies = client.resources("ImagingStudy").search(patient=patient_id).include(
        "ImagingStudy", "endpoint").fetch_all()
    out.mkdir(parents=True, exist_ok=True)
    size, kept = 0, 0
    for n, doc in enumerate(docs):
        plain: dict[str, Any] = dict(doc)  # a fhirpy resource is a dict of the JSON
        labels = [*(plain.get("meta", {}).get("security", []) or []), *(plain.get("securityLabel", []) or [])]
        if any("MASQUE_PS" in json.dumps(label) for label in labels):
            continue
        url = plain["content"][0]["attachment"]["url"]
        response = requests.get(url if url.startswith("http") else f"{base}/{url}", timeout=120)
        response.raise_for_status()
        (out / f"doc-{n:04d}.bin").write_bytes(response.content)
        size += len(response.content)
        kept += 1
    return {"documents": kept, "studies": sum(1 for s in studies if s["resourceType"] == "ImagingStudy"),
            "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True)
    parser.add_argument("--patient", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    summary = pull(args.source.rstrip("/"), args.patient, args.out)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
