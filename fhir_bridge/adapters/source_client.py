"""The national-record source client: IHE MHD ITI-67/ITI-68 and ImagingStudy search over async httpx.

One :class:`SourceClient` per source, opened once and reused. It is the
:class:`~fhir_bridge.ports.SourcePort`: the transactions the workflow asks for, built from modules named for
what they do, so that each guarantee is read in one place:

* :mod:`~fhir_bridge.adapters.source_http`: the connection (pooling, HTTP/2, TLS and mutual TLS), the one
  request loop (bounded concurrency, retries with full-jitter backoff honouring ``Retry-After``, a deadline per
  request), credentials only ever to the source's own origin, answers read capped and checked as FHIR JSON.
  ``SourceClient`` subclasses its :class:`~fhir_bridge.adapters.source_http.SourceHttp`.
* :mod:`~fhir_bridge.adapters.source_auth`: which credentials (STANDARDS.md §8: a static bearer token, SMART
  Backend Services tokens).
* :mod:`~fhir_bridge.adapters.source_paging`: every page of a search followed through
  ``Bundle.link[relation=next]``, a loop, a cross-origin next link or too many pages refused.
* :mod:`~fhir_bridge.adapters.source_retrieve`: ITI-68 streamed to disk, size and SHA-1 verified (MHD ITI-68
  §2:3.68.4.2, FHIR Attachment), SHA-256 taken, hashing in a worker thread.

What this module itself guarantees to the workflow:

* Patient resolution first (``Patient?identifier=SYSTEM|VALUE``), because not every server supports the
  chained ``patient.identifier`` search (STANDARDS.md §1); the Patient must really carry the identifier.
* ITI-67 searches with both ``patient`` and ``status`` (MHD ITI-67 §2:3.67.4.1.2).
* ImagingStudy searches with their Endpoints, ``_include``d or read one by one, never from another origin.

Audit (issue 7, STANDARDS.md §7): an optional ``on_exchange`` hook is awaited once per **logical exchange**,
when it ends, with a :class:`SourceExchange`: a whole search (every page, every retry: one event with the
first request as sent and the final status), one ITI-68 retrieve (its retries included), one Endpoint read.
Per logical exchange rather than per attempt because that is what an auditor asks about ("the bridge fetched
this patient's documents at 10:02"); the retries are in the logs. Every request of one exchange carries the
same ``X-Request-Id`` (the inbound call's id when there is one, see ``fhir_bridge.audit.context``), so the
source's own logs can be matched to our AuditEvents. A hook that raises (the audit log is down) makes the
exchange fail with that error: no audit, no exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.adapters.source_http import ConnectionOptions, OpenExchange, SourceHttp, redact
from fhir_bridge.adapters.source_paging import search_all
from fhir_bridge.adapters.source_retrieve import check_declared, retrieve_to_disk
from fhir_bridge.audit import context as audit_context
from fhir_bridge.errors import (
    AmbiguousPatient,
    AttachmentError,
    BridgeError,
    SourceError,
    SourceProtocolError,
    SourceRejected,
    UnknownPatient,
)
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource, dumps
from fhir_bridge.ports import RetrievedAttachment


@dataclass(frozen=True, slots=True)
class SourceExchange:
    """One logical exchange with the source, as the audit hook sees it once it is over.

    ``transaction`` is the IHE transaction it is (``ITI-78`` the Patient search, ``ITI-67`` the
    DocumentReference search, ``ITI-68`` a document retrieve) or None for a plain FHIR interaction with no
    IHE name (the ImagingStudy search, an Endpoint read); ``interaction`` the R4 restful-interaction
    (``search-type`` or ``read``); ``url`` the request URL without its query; ``query`` for a search, the
    first request as sent (``GET <url>?<query>``, patient identifier included: it goes to the audit log
    only); ``status`` the last HTTP status the source answered (None: no answer at all); ``patient`` the
    patient identifier when the client itself knows it (the ITI-78 search); ``error`` the error code when
    the exchange failed (``source-unavailable``, ``attachment-error:hash-mismatch``…).
    """

    transaction: str | None
    interaction: str
    resource_type: str
    url: str
    query: str | None
    status: int | None
    request_id: str
    patient: PatientIdentifier | None = None
    error: str | None = None
    submission_set: str | None = None  # ITI-65: the SubmissionSet's uniqueId


ExchangeHook = Callable[[SourceExchange], Awaitable[None]]


class SourceClient(SourceHttp):
    """An MHD/PDSm source; use as ``async with SourceClient(url, settings) as source: ...``.

    A :class:`~fhir_bridge.adapters.source_http.SourceHttp` (the connection, its base URL, ``absolute``,
    ``requests_made``) with the transactions on top: each one opens the audited exchange and sends its requests
    through that connection."""

    def __init__(self, base_url: str, settings: SourceSettings, *, on_exchange: ExchangeHook | None = None,
                 **connection: Unpack[ConnectionOptions]) -> None:
        super().__init__(base_url, settings, **connection)
        self._on_exchange = on_exchange

    async def __aenter__(self) -> SourceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the audit hook ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        transaction: str | None,
        interaction: str,
        resource_type: str,
        url: str,
        *,
        patient: PatientIdentifier | None = None,
    ) -> AsyncIterator[OpenExchange]:
        """One logical exchange: report it to ``on_exchange`` when it ends, whether it worked or not (an exchange
        cancelled part way, at shutdown, is not reported: its job runs again and its retry is)."""
        exchange = OpenExchange(audit_context.request_id.get() or str(uuid.uuid4()))
        try:
            yield exchange
        except Exception as exc:
            await self._report(exchange, transaction, interaction, resource_type, url, patient, exc)
            raise
        await self._report(exchange, transaction, interaction, resource_type, url, patient, None)

    async def _report(self, exchange: OpenExchange, transaction: str | None, interaction: str, resource_type: str,
                      url: str, patient: PatientIdentifier | None, error: Exception | None) -> None:
        if self._on_exchange is None:
            return
        status = exchange.status
        if status is None and isinstance(error, SourceError):
            status = error.status
        code = None
        if error is not None:
            code = error.code if isinstance(error, BridgeError) else type(error).__name__
            if isinstance(error, AttachmentError):
                code = f"{code}:{error.reason}"
        query = f"GET {exchange.first_url}" if interaction.startswith("search") and exchange.first_url else None
        await self._on_exchange(SourceExchange(
            transaction=transaction, interaction=interaction, resource_type=resource_type, url=redact(url),
            query=query, status=status, request_id=exchange.request_id, patient=patient, error=code,
            submission_set=exchange.submission_set,
        ))  # fmt: skip

    # -- searches -----------------------------------------------------------------------------------

    async def search(self, resource_type: str, params: Mapping[str, str]) -> tuple[list[Resource], list[Resource]]:
        """Every match and every ``include`` entry of a search, over all pages (one audited exchange)."""
        url = f"{self.base_url}/{resource_type}"
        async with self._exchange(None, "search-type", resource_type, url) as exchange:
            return await search_all(self, resource_type, params, exchange)

    async def find_patient(self, identifier: PatientIdentifier) -> Resource:
        """Resolve the Patient by identifier (PDQm-style ``Patient?identifier=``, audited as ITI-78), verifying
        the match."""
        url = f"{self.base_url}/Patient"
        async with self._exchange("ITI-78", "search-type", "Patient", url, patient=identifier) as exchange:
            matches, _ = await search_all(self, "Patient", {"identifier": identifier.token}, exchange)
        patients = [p for p in matches if p.get("resourceType") == "Patient"]
        carrying = [p for p in patients if any(identifier.matches(i) for i in p.get("identifier", []) or [])]
        if len(carrying) > 1:
            raise AmbiguousPatient("the source has more than one Patient with that identifier")
        if not carrying:
            if patients:
                raise SourceProtocolError("the source answered Patients that do not carry the requested identifier")
            raise UnknownPatient("no Patient with that identifier at the source")
        patient = carrying[0]
        if not isinstance(patient.get("id"), str):
            raise SourceProtocolError("the source's Patient has no id")
        return patient

    async def provide_document_bundle(self, bundle: Resource, *, patient: PatientIdentifier | None = None
                                      ) -> Resource:
        """ITI-65 Provide Document Bundle (MHD 4.2 §2:3.65.4.1.2): POST the ``transaction`` Bundle to the base and
        return the ``transaction-response`` (§2:3.65.4.2). Retried like every request: a retry after a lost answer
        is refused by the source as a duplicate masterIdentifier (409, SourceRejected), which the caller checks."""
        lists = [e.get("resource") or {} for e in bundle.get("entry", []) if (e.get("resource") or {}).get(
            "resourceType") == "List"]
        url = self.base_url
        async with self._exchange("ITI-65", "create", "Bundle", url, patient=patient) as exchange:
            exchange.submission_set = next((str(i.get("value")) for lst in lists for i in lst.get("identifier", [])
                                            if i.get("value")), None)
            response = await self.send("POST", url, stream=True, exchange=exchange, content=dumps(bundle))
            answer = await self.json_answer(response, url)
        if answer.get("resourceType") != "Bundle" or answer.get("type") != "transaction-response":
            raise SourceProtocolError("the source did not answer ITI-65 with a transaction-response Bundle")
        return answer

    async def find_document_references(
        self, patient_id: str, *, extra: Mapping[str, str] | None = None
    ) -> list[Resource]:
        """ITI-67 Find Document References: ``patient`` and ``status=current`` (MHD §2:3.67.4.1.2)."""
        params = {"patient": patient_id, "status": "current", **(extra or {})}
        url = f"{self.base_url}/DocumentReference"
        async with self._exchange("ITI-67", "search-type", "DocumentReference", url) as exchange:
            matches, _ = await search_all(self, "DocumentReference", params, exchange)
        return [r for r in matches if r.get("resourceType") == "DocumentReference"]

    async def find_imaging_studies(
        self, patient_id: str, *, extra: Mapping[str, str] | None = None
    ) -> tuple[list[Resource], dict[str, Resource]]:
        """ImagingStudy search with the Endpoints they reference, keyed by absolute reference.

        ``_include=ImagingStudy:endpoint`` is asked for; any endpoint the source did not include is read one
        by one (servers are free to ignore ``_include``). Contained endpoints (``#id``) need no fetch.
        """
        matches, included = await self.search(
            "ImagingStudy", {"patient": patient_id, "_include": "ImagingStudy:endpoint", **(extra or {})}
        )
        studies = [r for r in matches if r.get("resourceType") == "ImagingStudy"]
        endpoints: dict[str, Resource] = {}
        for resource in included:
            if resource.get("resourceType") == "Endpoint" and resource.get("id"):
                endpoints[self.absolute(f"Endpoint/{resource['id']}")] = resource
        wanted: set[str] = set()
        for study in studies:
            refs = list(study.get("endpoint", []) or [])
            for series in study.get("series", []) or []:
                refs.extend(series.get("endpoint", []) or [])
            for ref in refs:
                text = ref.get("reference") if isinstance(ref, dict) else None
                if isinstance(text, str) and not text.startswith("#"):
                    wanted.add(self.absolute(text))
        missing = sorted(wanted - endpoints.keys())
        fetched = await asyncio.gather(*(self._read_endpoint(url) for url in missing))
        for url, endpoint in zip(missing, fetched, strict=True):
            if endpoint is not None:
                endpoints[url] = endpoint
        return studies, endpoints

    async def _read_endpoint(self, url: str) -> Resource | None:
        if not self.same_origin(url):
            return None  # an Endpoint elsewhere is kept as an absolute reference, not fetched with our token
        try:
            async with self._exchange(None, "read", "Endpoint", url) as exchange:
                resource = await self.get_json(url, exchange=exchange)
        except SourceRejected:
            return None
        return resource if resource.get("resourceType") == "Endpoint" else None

    # -- ITI-68 -------------------------------------------------------------------------------------

    async def retrieve(
        self, url: str, dest: Path, *, expected_size: int | None = None, expected_sha1_b64: str | None = None
    ) -> RetrievedAttachment:
        """ITI-68 Retrieve Document: stream to ``dest`` and check size and hash (MHD §2:3.68.4.2)."""
        url = self.absolute(url)
        expected_sha1 = check_declared(url, expected_size, expected_sha1_b64, self.settings.max_attachment_bytes)
        async with self._exchange("ITI-68", "read", "Binary", url) as exchange:
            return await retrieve_to_disk(self, url, dest, expected_size, expected_sha1, exchange)
