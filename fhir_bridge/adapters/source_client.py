"""The national-record source client: IHE MHD ITI-67/ITI-68 and ImagingStudy search over async httpx.

One :class:`SourceClient` per source, opened once and reused (connection pooling, HTTP/2 when the source
offers it). What it guarantees to the workflow:

* Patient resolution first (``Patient?identifier=SYSTEM|VALUE``), because not every server supports the
  chained ``patient.identifier`` search (STANDARDS.md §1); the Patient must really carry the identifier.
* ITI-67 searches with both ``patient`` and ``status`` (MHD ITI-67 §2:3.67.4.1.2), every page followed
  through ``Bundle.link[relation=next]`` whatever page size the source imposes; a next link already seen,
  a next link to another origin (it would receive our credentials), or more pages than ``max_pages`` is a
  :class:`PagingError`/:class:`SourceProtocolError`, never an endless loop.
* ITI-68 retrieves stream to disk in chunks, never whole in memory, capped in size, with ``attachment.size``
  and the base64 SHA-1 ``attachment.hash`` verified (MHD ITI-68 §2:3.68.4.2, FHIR Attachment).
* Bounded concurrency (one semaphore for every request to this source), retries with full-jitter backoff on
  connection errors, timeouts and 408/429/502/503/504 honouring ``Retry-After`` (policy in
  :mod:`fhir_bridge.retry`), a deadline per request, no retry on other 4xx, the source's OperationOutcome
  kept in the error.
* Credentials (a bearer token provider, a client certificate) are only ever sent to the source's own origin:
  attachment URLs may point elsewhere (a separate document repository) and get no token.
* Outbound authentication per configuration (STANDARDS.md §8): a static bearer token, or SMART Backend Services
  (``token_url``: ``private_key_jwt`` tokens, :class:`~fhir_bridge.adapters.token_client.SourceTokenAuth`,
  renewed once when the source answers 401 ``invalid_token``), and/or a client certificate for mutual TLS
  (``client_cert``/``client_key``, verified against ``ca_bundle``). A TLS handshake the source refuses with an
  alert, or a source certificate that does not verify, is not retried: it will not get better by itself.

URLs in errors and logs have their query removed: queries carry patient identifiers.

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
import base64
import contextlib
import hashlib
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import structlog

from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.audit import context as audit_context
from fhir_bridge.errors import (
    AmbiguousPatient,
    AttachmentError,
    BridgeError,
    InvalidInput,
    NotAFhirSource,
    PagingError,
    SourceError,
    SourceProtocolError,
    SourceRejected,
    SourceUnavailable,
    UnknownPatient,
)
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import FHIR_JSON, Resource, dumps, loads
from fhir_bridge.ports import RetrievedAttachment
from fhir_bridge.retry import RetryPolicy

log = structlog.get_logger("fhir_bridge.source")

_CHUNK = 256 * 1024
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")


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


@dataclass(slots=True)
class _Exchange:
    """An exchange in progress: the id every request carries, the first URL sent, the last status seen."""

    request_id: str
    first_url: str | None = None
    status: int | None = None
    submission_set: str | None = None


class OutboundAuth(Protocol):
    """Gives the headers that authenticate us to the source (the SMART token flow plugs in here)."""

    async def headers(self) -> dict[str, str]: ...

    async def refused(self, sent: Mapping[str, str]) -> bool:
        """The source answered 401 ``invalid_token`` to a request sent with ``sent``; True when fresh headers
        are worth one more try (RFC 6750 §3.1)."""
        ...


class StaticBearer:
    """A fixed bearer token from configuration."""

    def __init__(self, token: str) -> None:
        self._headers = {"Authorization": f"Bearer {token}"}

    async def headers(self) -> dict[str, str]:
        return self._headers

    async def refused(self, sent: Mapping[str, str]) -> bool:
        return False  # the same token again would be refused again


def outbound_auth(settings: SourceSettings,
                  send: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> OutboundAuth | None:
    """The source authentication the settings ask for: SMART Backend Services when ``token_url`` is set (token
    requests go out through ``send``), a static bearer token, or none. InvalidInput when half configured."""
    if settings.token_url and settings.bearer_token:
        raise InvalidInput("set either source.token_url (SMART tokens) or source.bearer_token, not both")
    if settings.token_url:
        from fhir_bridge.adapters.token_client import BackendServicesAuth, SourceTokenAuth, load_private_jwk

        if urlsplit(settings.token_url).scheme not in ("http", "https") or not settings.client_id:
            raise InvalidInput("source.token_url must be an http(s) URL and source.client_id must be set")
        if not settings.private_key_jwk:
            raise InvalidInput("source.private_key_jwk must name our private JWK file (fhir-bridge clients keygen)")
        flow = BackendServicesAuth(settings.token_url, settings.client_id,
                                   load_private_jwk(Path(settings.private_key_jwk)), settings.scope)
        return SourceTokenAuth(flow, send)
    return StaticBearer(settings.bearer_token) if settings.bearer_token else None


def redact(url: str) -> str:
    """The URL without its query and fragment, safe for logs and error messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class SourceClient:
    """An MHD/PDSm source; use as ``async with SourceClient(url, settings) as source: ...``."""

    def __init__(
        self,
        base_url: str,
        settings: SourceSettings,
        *,
        auth: OutboundAuth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        policy: RetryPolicy | None = None,
        on_exchange: ExchangeHook | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise NotAFhirSource("the source URL must be an absolute http(s) URL")
        self.base_url = base_url.rstrip("/")
        self._settings = settings
        self._policy = policy or RetryPolicy(
            max_retries=settings.max_retries,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            retry_after_cap=settings.retry_after_cap,
        )
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._auth = auth or outbound_auth(settings, self._send_token_request)  # checked before any connection
        verify: ssl.SSLContext | bool = True
        if settings.ca_bundle or settings.client_cert:
            from fhir_bridge.adapters.tls import client_ssl_context  # cryptography: only when configured

            verify = client_ssl_context(settings.ca_bundle, settings.client_cert, settings.client_key)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.read_timeout,
                write=settings.write_timeout,
                pool=settings.pool_timeout,
            ),
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
            http2=settings.http2 and transport is None,
            verify=verify,
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": "fhir-bridge"},
        )
        self.requests_made = 0
        self._on_exchange = on_exchange

    async def __aenter__(self) -> SourceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send_token_request(self, request: httpx.Request) -> httpx.Response:
        """A token request to the source's token endpoint, through our pooled client (same TLS settings)."""
        return await self._http.send(request)

    # -- references -------------------------------------------------------------------------------

    def absolute(self, reference: str) -> str:
        """``Patient/1`` or a relative URL made absolute against the base (FHIR R4 references.html)."""
        if urlsplit(reference).scheme:
            return reference
        return urljoin(self.base_url + "/", reference)

    def _same_origin(self, url: str) -> bool:
        return _origin(url) == _origin(self.base_url)

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
    ) -> AsyncIterator[_Exchange]:
        """One logical exchange: report it to ``on_exchange`` when it ends, whether it worked or not (an exchange
        cancelled part way, at shutdown, is not reported: its job runs again and its retry is)."""
        exchange = _Exchange(audit_context.request_id.get() or str(uuid.uuid4()))
        try:
            yield exchange
        except Exception as exc:
            await self._report(exchange, transaction, interaction, resource_type, url, patient, exc)
            raise
        await self._report(exchange, transaction, interaction, resource_type, url, patient, None)

    async def _report(self, exchange: _Exchange, transaction: str | None, interaction: str, resource_type: str,
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

    # -- the one request loop ----------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, params: Mapping[str, str] | None = None,
                    accept: str = FHIR_JSON, stream: bool = False,
                    exchange: _Exchange | None = None, content: bytes | None = None) -> httpx.Response:
        """Send with retries; returns a response whose status is not retryable (caller closes it when streaming)."""
        deadline = time.monotonic() + self._settings.total_deadline
        attempt = 0
        last_status: int | None = None
        renewed = False
        while True:
            attempt += 1
            headers = {"Accept": accept}
            if content is not None:
                headers["Content-Type"] = FHIR_JSON
            if exchange is not None:
                headers["X-Request-Id"] = exchange.request_id
            credentials: dict[str, str] = {}
            retry_after: str | None = None
            try:
                if self._auth is not None and self._same_origin(url):  # never to another origin
                    try:
                        credentials = await self._auth.headers()
                    except (httpx.TransportError, httpx.TimeoutException) as exc:
                        raise _TokenEndpointUnreachable(exc) from exc
                    headers.update(credentials)
                async with self._slots:
                    self.requests_made += 1
                    request = self._http.build_request(method, url, params=params, headers=headers, content=content)
                    if exchange is not None and exchange.first_url is None:
                        exchange.first_url = str(request.url)
                    response = await self._http.send(request, stream=stream)
                last_status = response.status_code
                if exchange is not None:
                    exchange.status = last_status
                if (credentials and not renewed and _token_refused(response) and self._auth is not None
                        and await self._auth.refused(credentials)):
                    await response.aclose()
                    renewed = True  # once: a source refusing a fresh token too has its reasons
                    log.info("source.token_renewed", url=redact(url))
                    continue
                if not self._policy.should_retry_status(response.status_code):
                    return response
                retry_after = response.headers.get("Retry-After")
                problem = f"HTTP {response.status_code}"
                await response.aclose()
            except (httpx.TransportError, httpx.TimeoutException, _TokenEndpointUnreachable) as exc:
                cause = exc.error if isinstance(exc, _TokenEndpointUnreachable) else exc
                problem = type(cause).__name__ + (" from the token endpoint" if cause is not exc else "")
                last_status = None
                if exchange is not None:
                    exchange.status = None
                refusal = _tls_refusal(cause)
                if refusal is not None:
                    raise SourceUnavailable(f"TLS with the source failed ({refusal}) at {redact(url)}; check "
                                            "source.ca_bundle, client_cert and client_key", url=redact(url)) from None
            if not self._policy.can_retry(attempt):
                raise SourceUnavailable(
                    f"source did not answer after {attempt} tries ({problem}) at {redact(url)}", url=redact(url),
                    status=last_status,
                )
            wait = self._policy.delay(attempt, retry_after)
            if time.monotonic() + wait > deadline:
                raise SourceUnavailable(
                    f"source still failing ({problem}) when the {self._settings.total_deadline:g} s deadline "
                    f"came, at {redact(url)}",
                    url=redact(url), status=last_status,
                )
            log.info("source.retry", url=redact(url), problem=problem, attempt=attempt, wait=round(wait, 3))
            await asyncio.sleep(wait)

    async def _get_json(self, url: str, params: Mapping[str, str] | None = None,
                        exchange: _Exchange | None = None) -> Resource:
        response = await self._send("GET", url, params=params, stream=True, exchange=exchange)
        return await self._json_answer(response, url)

    async def _json_answer(self, response: httpx.Response, url: str) -> Resource:
        """The FHIR JSON resource of an answer (capped), or the error the answer amounts to."""
        try:
            body = await self._read_capped(response, self._settings.max_json_bytes)
        finally:
            await response.aclose()
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        is_json = content_type in _JSON_TYPES
        parsed: Any = None
        if is_json:
            try:
                parsed = loads(body)
            except SourceError:
                raise
            except Exception:
                parsed = None
        if response.status_code >= 400:
            outcome = parsed if isinstance(parsed, dict) and parsed.get("resourceType") == "OperationOutcome" else None
            if outcome is None and response.status_code in (404, 405, 406):
                raise NotAFhirSource(
                    f"{redact(url)} answered HTTP {response.status_code} without an OperationOutcome: "
                    "not a FHIR R4 endpoint",
                    status=response.status_code, url=redact(url),
                )
            raise SourceRejected(
                f"source refused the request: HTTP {response.status_code} at {redact(url)}"
                + (f" ({_outcome_text(outcome)})" if outcome else ""),
                status=response.status_code, outcome=outcome, url=redact(url),
            )
        if not isinstance(parsed, dict) or not isinstance(parsed.get("resourceType"), str):
            raise NotAFhirSource(
                f"{redact(url)} did not answer FHIR JSON (Content-Type {content_type or 'none'}): not a FHIR source",
                status=response.status_code, url=redact(url),
            )
        return parsed

    async def _read_capped(self, response: httpx.Response, cap: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.aiter_bytes(_CHUNK):
                total += len(chunk)
                if total > cap:
                    raise SourceProtocolError(
                        f"answer from {redact(str(response.url))} is over {cap} bytes", url=redact(str(response.url))
                    )
                chunks.append(chunk)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise SourceUnavailable(
                f"connection lost while reading {redact(str(response.url))} ({type(exc).__name__})"
            ) from None
        return b"".join(chunks)

    # -- searches -----------------------------------------------------------------------------------

    async def search_pages(self, resource_type: str, params: Mapping[str, str],
                           exchange: _Exchange | None = None) -> AsyncIterator[Resource]:
        """Yield each searchset page, following ``Bundle.link[next]`` (FHIR R4 http.html#paging)."""
        url = f"{self.base_url}/{resource_type}"
        page_params: Mapping[str, str] | None = {"_count": str(self._settings.page_size), **params}
        seen: set[str] = set()
        pages = 0
        while True:
            try:
                page = await self._get_json(url, page_params, exchange)
            except SourceRejected as exc:
                if exc.status in (404, 405) and pages == 0:  # no such type-level search at this base
                    raise NotAFhirSource(
                        f"{redact(url)} has no {resource_type} search (HTTP {exc.status}): not an MHD source base",
                        status=exc.status, outcome=exc.outcome, url=redact(url),
                    ) from None
                raise
            pages += 1
            if page.get("resourceType") != "Bundle" or page.get("type") != "searchset":
                raise SourceProtocolError(
                    f"a {resource_type} search answered a {page.get('resourceType')} "
                    f"({page.get('type', 'no type')}) where a searchset Bundle was expected",
                    url=redact(url),
                )
            yield page
            next_url = next(
                (link.get("url") for link in page.get("link", []) if link.get("relation") == "next"), None
            )
            if not next_url:
                return
            next_url = self.absolute(str(next_url))
            if not self._same_origin(next_url):
                raise SourceProtocolError("a next link points to another origin; not followed", url=redact(url))
            if next_url in seen or (page_params is None and next_url == url):
                raise PagingError(f"the {resource_type} search pages loop: a next link came back", url=redact(url))
            if pages >= self._settings.max_pages:
                raise PagingError(
                    f"the {resource_type} search has more than {self._settings.max_pages} pages "
                    "(source.max_pages)", url=redact(url),
                )
            seen.add(next_url)
            url, page_params = next_url, None

    async def search(self, resource_type: str, params: Mapping[str, str]) -> tuple[list[Resource], list[Resource]]:
        """Every match and every ``include`` entry of a search, over all pages (one audited exchange)."""
        url = f"{self.base_url}/{resource_type}"
        async with self._exchange(None, "search-type", resource_type, url) as exchange:
            return await self._search(resource_type, params, exchange)

    async def _search(self, resource_type: str, params: Mapping[str, str],
                      exchange: _Exchange) -> tuple[list[Resource], list[Resource]]:
        matches: list[Resource] = []
        included: list[Resource] = []
        async for page in self.search_pages(resource_type, params, exchange):
            for entry in page.get("entry", []) or []:
                resource = entry.get("resource")
                if not isinstance(resource, dict):
                    continue
                mode = (entry.get("search") or {}).get("mode", "match")
                if resource.get("resourceType") == "OperationOutcome" or mode == "outcome":
                    continue
                (included if mode == "include" else matches).append(resource)
        return matches, included

    async def find_patient(self, identifier: PatientIdentifier) -> Resource:
        """Resolve the Patient by identifier (PDQm-style ``Patient?identifier=``, audited as ITI-78), verifying
        the match."""
        url = f"{self.base_url}/Patient"
        async with self._exchange("ITI-78", "search-type", "Patient", url, patient=identifier) as exchange:
            matches, _ = await self._search("Patient", {"identifier": identifier.token}, exchange)
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
            response = await self._send("POST", url, stream=True, exchange=exchange, content=dumps(bundle))
            answer = await self._json_answer(response, url)
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
            matches, _ = await self._search("DocumentReference", params, exchange)
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
        if not self._same_origin(url):
            return None  # an Endpoint elsewhere is kept as an absolute reference, not fetched with our token
        try:
            async with self._exchange(None, "read", "Endpoint", url) as exchange:
                resource = await self._get_json(url, exchange=exchange)
        except SourceRejected:
            return None
        return resource if resource.get("resourceType") == "Endpoint" else None

    # -- ITI-68 -------------------------------------------------------------------------------------

    async def retrieve(
        self, url: str, dest: Path, *, expected_size: int | None = None, expected_sha1_b64: str | None = None
    ) -> RetrievedAttachment:
        """ITI-68 Retrieve Document: stream to ``dest`` and check size and hash (MHD §2:3.68.4.2)."""
        url = self.absolute(url)
        expected_sha1: bytes | None = None
        if expected_sha1_b64 is not None:
            try:
                expected_sha1 = base64.b64decode(expected_sha1_b64, validate=True)
            except ValueError:
                raise AttachmentError("attachment.hash is not base64", reason="bad-hash", url=redact(url)) from None
            if len(expected_sha1) != 20:
                raise AttachmentError("attachment.hash is not a SHA-1 digest", reason="bad-hash", url=redact(url))
        cap = self._settings.max_attachment_bytes
        if expected_size is not None and expected_size > cap:
            raise AttachmentError(f"declared size {expected_size} is over the {cap} byte limit",
                                  reason="too-large", url=redact(url))
        async with self._exchange("ITI-68", "read", "Binary", url) as exchange:
            for attempt in range(1, self._settings.max_retries + 2):
                try:
                    return await self._retrieve_once(url, dest, expected_size, expected_sha1, exchange)
                except SourceUnavailable:
                    if attempt > self._settings.max_retries:
                        raise
                    await asyncio.sleep(self._policy.backoff(attempt))
        raise AssertionError("unreachable")

    async def _retrieve_once(
        self, url: str, dest: Path, expected_size: int | None, expected_sha1: bytes | None, exchange: _Exchange
    ) -> RetrievedAttachment:
        try:
            response = await self._send("GET", url, accept="*/*", stream=True, exchange=exchange)
        except SourceUnavailable as exc:
            raise AttachmentError(str(exc), reason="retrieve-failed", url=redact(url)) from None
        cap = self._settings.max_attachment_bytes
        limit = min(cap, expected_size) if expected_size is not None else cap
        size = 0
        tmp = dest.with_name(dest.name + f".part{os.getpid()}")
        sink = _AttachmentSink(tmp)
        try:
            if response.status_code != 200:
                raise AttachmentError(
                    f"retrieve answered HTTP {response.status_code}", reason="retrieve-failed",
                    status=response.status_code, url=redact(url),
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                # chunks as they arrive: a fixed chunk size would make httpx copy every byte once more
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        reason = "too-large" if size > cap else "size-mismatch"
                        raise AttachmentError(
                            f"attachment is larger than {'the limit' if reason == 'too-large' else 'declared'}",
                            reason=reason, url=redact(url),
                        )
                    await sink.add(chunk)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                raise SourceUnavailable(f"connection lost during retrieve ({type(exc).__name__})") from None
            await sink.finish()
            if expected_size is not None and size != expected_size:
                raise AttachmentError(f"attachment has {size} bytes, {expected_size} declared",
                                      reason="size-mismatch", url=redact(url))
            if expected_sha1 is not None and sink.sha1.digest() != expected_sha1:
                raise AttachmentError("attachment bytes do not match attachment.hash (SHA-1)",
                                      reason="hash-mismatch", url=redact(url))
            os.replace(tmp, dest)
        finally:
            await sink.close()
            await response.aclose()
            tmp.unlink(missing_ok=True)
        return RetrievedAttachment(
            url=url, path=dest, size=size, sha1_b64=base64.b64encode(sink.sha1.digest()).decode("ascii"),
            sha256_hex=sink.sha256.hexdigest(),
            content_type=response.headers.get("Content-Type", "").split(";")[0].strip() or None,
        )


class _AttachmentSink:
    """Hashes an ITI-68 body and writes it to disk in a worker thread, about 1 MiB at a time, in order.

    hashlib and file writes release the GIL, so on a second core they run beside the event loop, which keeps
    reading this and the other responses (BENCHMARKS.md part 1: in the loop they were ~15% of a pull's time,
    opening the files another 5%). One batch at most is in the thread while the next one fills.
    """

    _BATCH = 1 << 20

    def __init__(self, path: Path) -> None:
        self.sha1, self.sha256 = hashlib.sha1(usedforsecurity=False), hashlib.sha256()
        self._path = path
        self._out: Any = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flight: asyncio.Future[None] | None = None

    async def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= self._BATCH:
            await self._flush()

    async def finish(self) -> None:
        """Every byte hashed and written, the file closed."""
        await self._flush(last=True)
        if self._flight is not None:
            await self._flight
        self._flight = None

    async def close(self) -> None:
        """Stop after an error: let the thread finish its batch, close the file (nothing else is written)."""
        if self._flight is not None:
            await asyncio.wait([self._flight])
        self._close()

    async def _flush(self, *, last: bool = False) -> None:
        if self._flight is not None:
            await self._flight
        batch, self._pending, self._pending_size = self._pending, [], 0
        self._flight = asyncio.get_running_loop().run_in_executor(None, self._absorb, batch, last)

    def _absorb(self, batch: list[bytes], last: bool) -> None:
        if self._out is None:
            self._out = self._path.open("wb")
        for chunk in batch:
            self.sha1.update(chunk)
            self.sha256.update(chunk)
            self._out.write(chunk)
        if last:
            self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class _TokenEndpointUnreachable(Exception):
    """The token endpoint did not answer (a transport error): retried like the source itself not answering."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _token_refused(response: httpx.Response) -> bool:
    """RFC 6750 §3.1: 401 with ``WWW-Authenticate: Bearer error="invalid_token"``."""
    return response.status_code == 401 and "invalid_token" in response.headers.get("WWW-Authenticate", "")


def _tls_refusal(error: BaseException) -> str | None:
    """The reason of a TLS failure that retrying will not cure: the source's certificate does not verify, or the
    source refused the handshake with an alert (no or a wrong client certificate). None for anything else."""
    seen: BaseException | None = error
    for _ in range(8):  # the ssl error sits a few links down httpx's and httpcore's exception chain
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"the source's certificate did not verify: {seen.verify_message or seen.reason}"
        if isinstance(seen, ssl.SSLError) and "ALERT" in str(seen.reason or ""):
            return f"the source refused the handshake: {seen.reason}"
        seen = seen.__cause__ or seen.__context__
    return None


def _outcome_text(outcome: Mapping[str, Any]) -> str:
    texts = []
    for issue in outcome.get("issue", []) or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text:
            texts.append(str(text)[:200])
    return "; ".join(texts[:3]) or "no details"
