"""The auditor's web page (issue 7 item 4): the audit trail, read-only, server-rendered, no script.

* ``GET /audit``: the recorded exchanges, newest first, with filters as query parameters (a plain GET form):
  ``from`` and ``to`` (dates or date-times, UTC when no zone; ``to`` includes the day or minute given),
  ``patient`` (the patient's identifier ``SYSTEM|VALUE``), ``agent`` (a client id, ``fhir-bridge``, the
  source's URL), ``subtype`` (``ITI-67``, ``read``, ``collecting``… or ``system|code``), ``outcome`` (0, 4, 8,
  12); comma-separated values are ORed as in the FHIR search; ``count`` and ``offset`` page.
* ``GET /audit/{seq}``: one event: every field of every agent, entity and of its source and outcome, its chain
  link, and the raw JSON as stored (pretty-printed).
* Every page shows the chain's status: ``RedisAuditLog.verify()`` (verified, or the first broken seq and why;
  how many events were checked), the chain's end, the last signed checkpoint and the retention floor.

**Every value is escaped**, invisible characters shown, and the answers confined by strict headers (no script at
all): :mod:`fhir_bridge.api.audit_html`.

**Viewing the audit log is an access to patient data, so every view is audited itself**, fail closed as the
API is. The FHIR audit middleware only records ``/fhir`` and ``/auth`` calls and describes a call from its FHIR
path, so the page records its own BALP RESTful event (:func:`fhir_bridge.audit.events.rest_event`) before it answers:
the list as a ``search-type`` on AuditEvent whose query entity is the raw request (``GET /audit?…``), the detail
as a ``read`` of ``AuditEvent/<seq>`` naming the patient of the event shown; the client comes from the same seam
as the API's (:func:`fhir_bridge.api.audit_middleware.client_party`), the bridge agent's address is
``<base>/audit``, the X-Request-Id is taken or made and echoed. Refused views (a bad filter, an unknown seq, a
refused role) are recorded too. When the event cannot be stored the page answers 503 and shows nothing.

**Role**: only auditors may see this page: :func:`~fhir_bridge.api.audit_session.require_auditor` (a bearer
token or the session cookie of ``POST /audit/session``), looked up in this module at each view: the one seam the
security layer decides through.

The page is four modules, so that the routes and what they record, each view, the HTML, and the one part that
handles a credential can each be read alone:

* this one: the routes, each view audited then answered (:func:`_page`), and the chain's status;
* :mod:`fhir_bridge.api.audit_views`: the list and the detail: what each reads from the log and shows;
* :mod:`fhir_bridge.api.audit_html`: the HTML every view shares: escaping, the stylesheet and the confining
  headers, the document, error answers and the sign-in form, a table of an event's fields;
* :mod:`fhir_bridge.api.audit_session`: who may see the page, and the sign-in that keeps an auditor's token in
  a cookie.

Mounted by :func:`fhir_bridge.api.app.create_app` with ``app.include_router(audit_page.router)``.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable

import structlog
from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from fhir_bridge.api.audit_html import (
    CONTENT_SECURITY_POLICY,
    ERROR_TITLES,
    LOGIN_FORM,
    PAGE_PATH,
    answer,
    error_main,
    root_path,
    text,
)
from fhir_bridge.api.audit_middleware import REQUEST_ID_HEADER, client_party
from fhir_bridge.api.audit_routes import audit_log
from fhir_bridge.api.audit_session import open_session, require_auditor
from fhir_bridge.api.audit_views import View, detail_view, list_view
from fhir_bridge.api.errors import status_for
from fhir_bridge.audit.events import Party, rest_event
from fhir_bridge.errors import AuditUnavailable, BridgeError

# the page's public names (CONTENT_SECURITY_POLICY, PAGE_PATH, text: audit_html's; require_auditor: audit_session's)
__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_PATH", "require_auditor", "router", "text"]

log = structlog.get_logger("fhir_bridge.audit")

router = APIRouter(include_in_schema=False)

#: how long a page waits for the chain's verification (it reads the whole chain) before saying "not known"
VERIFY_TIMEOUT_SECONDS = 20.0
_MAX_SEQ_DIGITS = 15
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")  # as the middleware takes a client's X-Request-Id


# ---------------------------------------------------------------------------------------------- the routes


@router.post(PAGE_PATH + "/session")
async def audit_session(request: Request) -> Response:
    """Open a browser session from an auditor access token (:func:`fhir_bridge.api.audit_session.open_session`)."""
    return await open_session(request)


@router.get(PAGE_PATH)
async def audit_list(request: Request) -> Response:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    qs = request.scope.get("query_string") or b""
    view = View("search-type", query=b"GET " + raw + (b"?" + qs if qs else b""))
    return await _page(request, view, list_view)


@router.get(PAGE_PATH + "/{seq}")
async def audit_detail(request: Request, seq: str) -> Response:
    valid = seq.isascii() and seq.isdigit() and len(seq) <= _MAX_SEQ_DIGITS and int(seq) >= 1
    view = View("read", resource_id=str(int(seq)) if valid else None)

    async def render(request: Request, view: View) -> tuple[str, str]:
        return await detail_view(request, view, int(seq) if valid else None)

    return await _page(request, view, render)


# ------------------------------------------------------------------------------- one view, audited, answered


Render = Callable[[Request, View], Awaitable[tuple[str, str]]]


async def _page(request: Request, view: View, render: Render) -> Response:
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given if given and _REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
    status, problem, chain = 200, None, True
    try:
        require_auditor(request)
        title, main = await render(request, view)
    except AuditUnavailable as exc:
        status, problem, chain = 503, exc.message, False
        title, main = error_main(status, "Journal d'audit indisponible (audit log unavailable)", exc.message)
    except BridgeError as exc:
        status, problem = status_for(exc), exc.message
        chain = status not in (401, 403)
        title, main = error_main(status, ERROR_TITLES.get(status, "Erreur (error)"), exc.message)
        if status in (401, 403):
            main += LOGIN_FORM
    except Exception as exc:  # a page that failed is still an access to record
        log.error("audit_page.unexpected", error=type(exc).__name__, path=request.url.path)
        status, problem, chain = 500, "internal error; the page was not built", False
        title, main = error_main(status, "Erreur interne (internal error)", problem)
    if chain:
        main = await _chain_status(request) + main
    try:
        await _record(request, view, status, request_id, problem)
    except Exception as exc:  # fail closed: no audit, no page
        if not isinstance(exc, AuditUnavailable):
            log.error("audit.record_failed", error=type(exc).__name__, path=request.url.path)
        status = 503
        title, main = error_main(status, "Journal d'audit indisponible (audit log unavailable)",
                                 "this view could not be recorded in the audit trail, so it is not shown; "
                                 "retry later")  # fmt: skip
    return answer(request, status, title, main, request_id)


async def _record(request: Request, view: View, status: int, request_id: str, problem: str | None) -> None:
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        return  # no log configured: nothing can be shown either (audit_log() refused the page: 503)
    bridge: Party = getattr(request.app.state, "audit_bridge", None) or Party("fhir-bridge", name="fhir-bridge")
    server = Party(bridge.id, system=bridge.system, address=_public_base(request) + PAGE_PATH, name=bridge.name)
    event = rest_event(interaction=view.interaction, resource_type="AuditEvent", status=status,
                       client=client_party(request), bridge=server, resource_id=view.resource_id,
                       patient=view.patient, query=view.query, request_id=request_id,
                       outcome_desc=problem[:300] if problem and status >= 400 else None)  # fmt: skip
    await audit.append(event)


def _public_base(request: Request) -> str:
    settings = getattr(request.app.state, "settings", None)
    configured: str = settings.api.public_base_url.rstrip("/") if settings is not None else ""
    return configured or str(request.base_url).rstrip("/")


# ------------------------------------------------------------------------------------------- the chain status


async def _chain_status(request: Request) -> str:
    try:
        log_ = audit_log(request)
        async with asyncio.timeout(VERIFY_TIMEOUT_SECONDS):
            result = await log_.verify()
            state = await log_.state()
    except (AuditUnavailable, RedisError, OSError, TimeoutError) as exc:
        why = ("la vérification a pris trop de temps; lancez « fhir-bridge audit verify » (verification took too "
               "long; run fhir-bridge audit verify)") if isinstance(exc, TimeoutError) else (
               f"le journal ne peut pas être lu (the log cannot be read: {type(exc).__name__})")  # fmt: skip
        return (f'<section id="chain-status" class="chain unknown" data-status="unknown" aria-labelledby="chain-h">\n'
                f'<h2 id="chain-h">État de la chaîne (chain status)</h2>\n<p><strong>Inconnu (unknown)</strong> : '
                f"{text(why)}</p>\n</section>\n")  # fmt: skip
    if result.ok:
        verdict = (f"<strong>Chaîne vérifiée (chain verified)</strong> : {result.count} événements contrôlés, "
                   f"empreintes et points de contrôle signés compris ({result.count} events checked, hashes and "
                   "signed checkpoints included)")  # fmt: skip
    else:
        first = result.first_broken_seq
        where = (f'<a href="{text(root_path(request) + PAGE_PATH)}/{first}">N° {first}</a>' if first is not None
                 else "?")  # fmt: skip
        verdict = (f"<strong>Chaîne rompue (chain broken)</strong> au premier maillon rompu {where} (first broken "
                   f"seq {text(first if first is not None else '?')}) : {text(result.reason)}; "
                   f"{result.count} événements contrôlés avant (events checked before it)")  # fmt: skip
    status = "verified" if result.ok else "broken"
    broken = "" if result.ok else f' data-first-broken="{text(result.first_broken_seq or "")}"'
    items = [("Dernier événement (chain end, seq)", str(state.seq)),
             ("Dernier point de contrôle signé (last signed checkpoint, seq)", str(state.checkpoint_seq) if
              state.checkpoint_seq else "aucun (none)")]  # fmt: skip
    if state.floor is not None:
        items.append(("Plancher de rétention (retention floor, seq)", str(state.floor.seq)))
    items.append(("Empreinte de fin (chain end hash)", state.hash))
    details = "".join(f"<dt>{text(k)}</dt><dd>{text(v)}</dd>" for k, v in items)
    return (f'<section id="chain-status" class="chain {status}" data-status="{status}"{broken} '
            f'aria-labelledby="chain-h">\n<h2 id="chain-h">État de la chaîne (chain status)</h2>\n'
            f"<p>{verdict}</p>\n<dl>{details}</dl>\n</section>\n")  # fmt: skip
