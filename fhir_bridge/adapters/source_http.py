"""The source client's HTTP layer: one pooled httpx connection to one source, and the one request loop.

Its own module because every transaction of :class:`~fhir_bridge.adapters.source_client.SourceClient` (the
searches of :mod:`~fhir_bridge.adapters.source_paging`, the retrieves of
:mod:`~fhir_bridge.adapters.source_retrieve`, ITI-65) goes through the same few guarantees, kept here in one
place; ``SourceClient`` is this connection with the IHE transactions on top (it subclasses :class:`SourceHttp`).

* Connection pooling, HTTP/2 when the source offers it, no redirects followed.
* Bounded concurrency (one semaphore for every request to this source), retries with full-jitter backoff on
  connection errors, timeouts and 408/429/502/503/504 honouring ``Retry-After`` (policy in
  :mod:`fhir_bridge.retry`), a deadline per request, no retry on other 4xx, the source's OperationOutcome
  kept in the error.
* Credentials (a bearer token provider, see :mod:`~fhir_bridge.adapters.source_auth`; a client certificate)
  are only ever sent to the source's own origin: attachment URLs may point elsewhere (a separate document
  repository) and get no token. A token the source refuses with 401 ``invalid_token`` is renewed once.
* Mutual TLS per configuration (STANDARDS.md §8: ``client_cert``/``client_key``, verified against
  ``ca_bundle``). A TLS handshake the source refuses with an alert, or a source certificate that does not
  verify, is not retried: it will not get better by itself.
* Answers read capped (``max_json_bytes``) and parsed as FHIR JSON, or turned into the error they amount to
  (:class:`~fhir_bridge.errors.NotAFhirSource`, :class:`~fhir_bridge.errors.SourceRejected`).

URLs in errors and logs have their query removed: queries carry patient identifiers.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import structlog

from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.adapters.source_auth import OutboundAuth, outbound_auth
from fhir_bridge.errors import NotAFhirSource, SourceError, SourceProtocolError, SourceRejected, SourceUnavailable
from fhir_bridge.fhir.resources import FHIR_JSON, Resource, loads
from fhir_bridge.retry import RetryPolicy

log = structlog.get_logger("fhir_bridge.source")

_CHUNK = 256 * 1024
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")


@dataclass(slots=True)
class OpenExchange:
    """An exchange in progress: the id every request carries, the first URL sent, the last status seen (what the
    audit hook reports once the exchange is over, see ``SourceClient``)."""

    request_id: str
    first_url: str | None = None
    status: int | None = None
    submission_set: str | None = None


def redact(url: str) -> str:
    """The URL without its query and fragment, safe for logs and error messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class ConnectionOptions(TypedDict, total=False):
    """What a test or a deployment may give the connection instead of what the settings make: the outbound
    credentials, an httpx transport (tests), the retry policy."""

    auth: OutboundAuth | None
    transport: httpx.AsyncBaseTransport | None
    policy: RetryPolicy | None


class SourceHttp:
    """The connection to one source; closed with :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        settings: SourceSettings,
        *,
        auth: OutboundAuth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise NotAFhirSource("the source URL must be an absolute http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.policy = policy or RetryPolicy(
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

    def same_origin(self, url: str) -> bool:
        """Whether ``url`` is on the source's own origin, the only one that gets our credentials."""
        return _origin(url) == _origin(self.base_url)

    # -- the one request loop ----------------------------------------------------------------------

    async def send(self, method: str, url: str, *, params: Mapping[str, str] | None = None,
                   accept: str = FHIR_JSON, stream: bool = False,
                   exchange: OpenExchange | None = None, content: bytes | None = None) -> httpx.Response:
        """Send with retries; returns a response whose status is not retryable (caller closes it when streaming)."""
        deadline = time.monotonic() + self.settings.total_deadline
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
                if self._auth is not None and self.same_origin(url):  # never to another origin
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
                if not self.policy.should_retry_status(response.status_code):
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
            if not self.policy.can_retry(attempt):
                raise SourceUnavailable(
                    f"source did not answer after {attempt} tries ({problem}) at {redact(url)}", url=redact(url),
                    status=last_status,
                )
            wait = self.policy.delay(attempt, retry_after)
            if time.monotonic() + wait > deadline:
                raise SourceUnavailable(
                    f"source still failing ({problem}) when the {self.settings.total_deadline:g} s deadline "
                    f"came, at {redact(url)}",
                    url=redact(url), status=last_status,
                )
            log.info("source.retry", url=redact(url), problem=problem, attempt=attempt, wait=round(wait, 3))
            await asyncio.sleep(wait)

    async def get_json(self, url: str, params: Mapping[str, str] | None = None,
                       exchange: OpenExchange | None = None) -> Resource:
        """GET a FHIR JSON resource, with :meth:`send`'s retries and :meth:`json_answer`'s checks."""
        response = await self.send("GET", url, params=params, stream=True, exchange=exchange)
        return await self.json_answer(response, url)

    async def json_answer(self, response: httpx.Response, url: str) -> Resource:
        """The FHIR JSON resource of an answer (capped), or the error the answer amounts to."""
        try:
            body = await self._read_capped(response, self.settings.max_json_bytes)
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
