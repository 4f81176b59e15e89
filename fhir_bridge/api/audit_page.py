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

**Every value is escaped** (:func:`text`): client ids, X-Request-Ids, raw queries and outcome descriptions are
what callers sent us. Control and bidirectional-override characters are shown as ``\\uXXXX`` so that a value can
neither hide nor reorder what the auditor reads. The answers carry a strict Content-Security-Policy (no
script at all, the one inline stylesheet allowed by its hash), ``X-Frame-Options: DENY``, ``Cache-Control:
no-store`` and ``Referrer-Policy: no-referrer`` (the URLs hold patient identifiers).

**Viewing the audit log is an access to patient data, so every view is audited itself**, fail closed as the
API is. The FHIR audit middleware only records ``/fhir`` and ``/auth`` calls and describes a call from its FHIR
path, so the page records its own BALP RESTful event (:func:`fhir_bridge.audit.events.rest_event`) before it answers:
the list as a ``search-type`` on AuditEvent whose query entity is the raw request (``GET /audit?…``), the detail
as a ``read`` of ``AuditEvent/<seq>`` naming the patient of the event shown; the client comes from the same seam
as the API's (:func:`fhir_bridge.api.audit_middleware.client_party`), the bridge agent's address is
``<base>/audit``, the X-Request-Id is taken or made and echoed. Refused views (a bad filter, an unknown seq, a
refused role) are recorded too. When the event cannot be stored the page answers 503 and shows nothing.

**Role**: only auditors may see this page. The check belongs to the security layer; :func:`require_auditor` is
its one seam, and it lets everyone in until that layer exists.

Mounted by :func:`fhir_bridge.api.app.create_app` with ``app.include_router(audit_page.router)``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import html
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog
from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import RedirectResponse, Response

from fhir_bridge.access.tenancy import require_scope
from fhir_bridge.api.audit_middleware import REQUEST_ID_HEADER, client_party, resource_patient
from fhir_bridge.api.audit_routes import audit_log, parse_audit_search, stored_event
from fhir_bridge.api.errors import status_for
from fhir_bridge.api.fhir_io import read_form
from fhir_bridge.api.security import bearer_token, context_from
from fhir_bridge.audit.chain import CHAIN_URL, chain_link
from fhir_bridge.audit.events import OBJECT_ROLE, Party, rest_event
from fhir_bridge.errors import AuditUnavailable, BridgeError, Forbidden, InvalidInput, NotFound
from fhir_bridge.fhir.identity import PatientIdentifier

__all__ = ["CONTENT_SECURITY_POLICY", "PAGE_PATH", "require_auditor", "router", "text"]

log = structlog.get_logger("fhir_bridge.audit")

router = APIRouter(include_in_schema=False)

PAGE_PATH = "/audit"
SESSION_COOKIE = "fhir_bridge_audit"
_MAX_SESSION_FORM = 16 * 1024
#: how long a page waits for the chain's verification (it reads the whole chain) before saying "not known"
VERIFY_TIMEOUT_SECONDS = 20.0
_MAX_SEQ_DIGITS = 15
_MAX_OFFSET = 10_000_000
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")  # as the middleware takes a client's X-Request-Id
# C0/C1 controls (but tab and newline), zero-width and bidirectional formatting characters, BOM
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")

STYLE = """
body{font:16px/1.45 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fff}
header{background:#000091;color:#fff;padding:.6rem 1rem}header a{color:#fff}
header p{margin:0;font-weight:bold}header nav{margin-top:.3rem}
main{padding:1rem;max-width:96rem}
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:1rem;background:#fff;color:#000;padding:.3rem}
a{color:#000091}a:focus,input:focus,select:focus,button:focus{outline:3px solid #0a76f6;outline-offset:2px}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;width:100%}
caption{text-align:left;font-weight:bold;padding:.3rem 0}
th,td{border:1px solid #929292;padding:.25rem .45rem;text-align:left;vertical-align:top}
thead th{background:#eee}tbody th{font-weight:normal}
td,th{overflow-wrap:anywhere}
code,pre{font-family:ui-monospace,monospace;font-size:.9rem}
pre{background:#f6f6f6;border:1px solid #ccc;padding:.6rem;white-space:pre-wrap;overflow-wrap:anywhere}
fieldset{border:1px solid #929292;margin:0 0 1rem}
.filters{display:flex;flex-wrap:wrap;gap:.6rem 1.2rem;align-items:flex-end}
.filters label{display:block;font-size:.9rem}
.chain{border:2px solid;padding:.4rem .8rem;margin:0 0 1rem}
.chain h2{font-size:1rem;margin:.2rem 0}.chain dl{margin:.2rem 0}
.chain dt{display:inline;font-weight:bold}.chain dd{display:inline;margin:0 1rem 0 .3rem}
.verified{border-color:#18753c;background:#b8fec9}.broken{border-color:#ce0500;background:#ffe9e9}
.unknown{border-color:#b34000;background:#fff4e5}
.o4,.o8,.o12{color:#ce0500;font-weight:bold}
.sys{color:#555;font-size:.85rem}
.pager a{margin-right:1rem}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
                           "base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
}

OUTCOME_LABELS = {"0": "Succès (success)", "4": "Échec mineur (minor failure)",
                  "8": "Échec grave (serious failure)", "12": "Échec majeur (major failure)"}  # fmt: skip
ACTION_LABELS = {"C": "Création (create)", "R": "Lecture (read)", "U": "Modification (update)",
                 "D": "Suppression (delete)", "E": "Exécution (execute)"}  # fmt: skip
# the labels of the fields an auditor reads most, by their path with list indexes taken out
FIELD_LABELS = {
    "type.coding.code": "Rôle (role)", "type.coding.display": "Libellé du rôle (role name)",
    "type.coding.system": "Système du rôle (role system)", "type.code": "Type (type)",
    "type.display": "Libellé du type (type name)", "type.system": "Système du type (type system)",
    "who.identifier.value": "Identifiant (identifier)", "who.identifier.system": "Émetteur (issuer)",
    "who.display": "Nom affiché (display)", "name": "Nom (name)", "requestor": "Demandeur (requestor)",
    "policy": "Jeton d'accès (access token jti)", "network.address": "Adresse réseau (network address)",
    "network.type": "Type d'adresse (network type)", "what.reference": "Objet (reference)",
    "what.type": "Type d'objet (resource type)", "what.identifier.value": "Identifiant (identifier)",
    "what.identifier.system": "Système d'identifiant (identifier system)", "role.code": "Rôle (role)",
    "role.display": "Libellé du rôle (role name)", "role.system": "Système du rôle (role system)",
    "query": "Requête, base64 (query, base64)", "observer.identifier.value": "Observateur (observer)",
    "observer.display": "Nom de l'observateur (observer name)", "site": "Site (site)",
    "id": "N° (seq)", "recorded": "Enregistré (recorded)", "action": "Action (action)",
    "outcome": "Résultat (outcome)", "outcomeDesc": "Description du résultat (outcome description)",
    "subtype.code": "Sous-type (subtype)", "subtype.system": "Système du sous-type (subtype system)",
    "subtype.display": "Libellé du sous-type (subtype name)", "period.start": "Début (period start)",
    "period.end": "Fin (period end)", "description": "Description (description)",
}  # fmt: skip
# the order an auditor reads an event's parts in (stored events have their keys sorted); the rest follow
_ORDER = {
    "event": ("resourceType", "id", "recorded", "type", "subtype", "action", "outcome", "outcomeDesc", "period",
              "purposeOfEvent"),
    "agent": ("who", "name", "requestor", "type", "role", "network", "policy", "altId", "location", "purposeOfUse"),
    "source": ("observer", "site", "type"),
    "entity": ("what", "type", "role", "name", "description", "query", "lifecycle", "securityLabel", "detail"),
}  # fmt: skip
_SUBTYPE_HINTS = ("ITI-65", "ITI-67", "ITI-68", "ITI-78", "read", "vread", "search-type", "create", "update",
                  "operation", "history-instance", "capabilities", "delivery")  # fmt: skip


def require_auditor(request: Request) -> None:
    """Only auditors see this page: a bridge access token of role ``auditor`` with ``system/AuditEvent.r``.

    The token comes as ``Authorization: Bearer`` (tools, a reverse proxy) or from the session cookie that
    ``POST /audit/session`` sets. Unauthenticated (401) or Forbidden (403) otherwise; the refusal is a page,
    audited like any other view. The caller's client id and ``jti`` are then on the view's AuditEvent.
    """
    who = context_from(request, bearer_token(request) or request.cookies.get(SESSION_COOKIE))
    require_scope(who, "AuditEvent", "r")
    if who.role != "auditor":
        raise Forbidden("only auditor clients read the audit trail")


_LOGIN_FORM = (f'<form method="post" action="{PAGE_PATH}/session"><p><label for="t">Jeton d\'accès auditeur '
               '(auditor access token)</label><br><textarea id="t" name="access_token" rows="4" cols="80" '
               'autocomplete="off" spellcheck="false" required></textarea></p>'
               '<p><button type="submit">Ouvrir la session (sign in)</button></p></form>\n'
               '<p class="sys">fhir-bridge clients token --id &lt;auditor&gt; --key &lt;private JWK&gt; '
               '--scope system/AuditEvent.rs</p>\n')


@router.post(PAGE_PATH + "/session")
async def audit_session(request: Request) -> Response:
    """Open a browser session from an auditor access token (form field ``access_token``).

    The token is checked as :func:`require_auditor` does, then kept in an ``HttpOnly`` cookie
    (``SameSite=Lax``, path ``/audit``, ``Secure`` over https) that lives no longer than the token (≤ 300 s):
    the page is read-only, so Lax suffices and lets the first navigation carry the cookie.
    """
    form = dict(await read_form(request, _MAX_SESSION_FORM, "the session form"))
    token = form.get("access_token", "").strip()
    try:
        who = context_from(request, token)
        require_scope(who, "AuditEvent", "r")
        if who.role != "auditor":
            raise Forbidden("only auditor clients read the audit trail")
    except BridgeError as exc:
        status = status_for(exc)
        title, main = _error_main(status, _ERROR_TITLES.get(status, "Erreur (error)"), exc.message)
        return _answer(request, status, title, main + _LOGIN_FORM, str(uuid.uuid4()))
    response = RedirectResponse(_root(request) + PAGE_PATH, status_code=303)
    lifetime = max(1, int(who.expires_at - time.time())) if who.expires_at else 60
    response.set_cookie(SESSION_COOKIE, token, max_age=lifetime, path=PAGE_PATH, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https")
    response.headers["Cache-Control"] = "no-store"
    return response


# ---------------------------------------------------------------------------------------------- the routes


@router.get(PAGE_PATH)
async def audit_list(request: Request) -> Response:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    qs = request.scope.get("query_string") or b""
    view = _View("search-type", query=b"GET " + raw + (b"?" + qs if qs else b""))
    return await _page(request, view, _list)


@router.get(PAGE_PATH + "/{seq}")
async def audit_detail(request: Request, seq: str) -> Response:
    valid = seq.isascii() and seq.isdigit() and len(seq) <= _MAX_SEQ_DIGITS and int(seq) >= 1
    view = _View("read", resource_id=str(int(seq)) if valid else None)

    async def render(request: Request, view: _View) -> tuple[str, str]:
        return await _detail(request, view, int(seq) if valid else None)

    return await _page(request, view, render)


# ------------------------------------------------------------------------------- one view, audited, answered


@dataclass(slots=True)
class _View:
    """What the view's own AuditEvent says: filled in as the page is built."""

    interaction: str
    resource_id: str | None = None
    query: bytes | None = None
    patient: PatientIdentifier | None = None


Render = Callable[[Request, _View], Awaitable[tuple[str, str]]]


async def _page(request: Request, view: _View, render: Render) -> Response:
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given if given and _REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
    status, problem, chain = 200, None, True
    try:
        require_auditor(request)
        title, main = await render(request, view)
    except AuditUnavailable as exc:
        status, problem, chain = 503, exc.message, False
        title, main = _error_main(status, "Journal d'audit indisponible (audit log unavailable)", exc.message)
    except BridgeError as exc:
        status, problem = status_for(exc), exc.message
        chain = status not in (401, 403)
        title, main = _error_main(status, _ERROR_TITLES.get(status, "Erreur (error)"), exc.message)
        if status in (401, 403):
            main += _LOGIN_FORM
    except Exception as exc:  # a page that failed is still an access to record
        log.error("audit_page.unexpected", error=type(exc).__name__, path=request.url.path)
        status, problem, chain = 500, "internal error; the page was not built", False
        title, main = _error_main(status, "Erreur interne (internal error)", problem)
    if chain:
        main = await _chain_status(request) + main
    try:
        await _record(request, view, status, request_id, problem)
    except Exception as exc:  # fail closed: no audit, no page
        if not isinstance(exc, AuditUnavailable):
            log.error("audit.record_failed", error=type(exc).__name__, path=request.url.path)
        status = 503
        title, main = _error_main(status, "Journal d'audit indisponible (audit log unavailable)",
                                  "this view could not be recorded in the audit trail, so it is not shown; "
                                  "retry later")  # fmt: skip
    return _answer(request, status, title, main, request_id)


async def _record(request: Request, view: _View, status: int, request_id: str, problem: str | None) -> None:
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


_ERROR_TITLES = {400: "Filtre invalide (invalid filter)", 401: "Authentification requise (authentication required)",
                 403: "Accès réservé aux auditeurs (auditors only)", 404: "Événement introuvable (no such event)",
                 410: "Événement purgé par la rétention (removed by the retention policy)"}  # fmt: skip


def _error_main(status: int, title: str, message: str) -> tuple[str, str]:
    note = f'<span class="sys">(HTTP {status})</span>'
    return title, f'<h1>{text(title)}</h1>\n<p role="alert">{text(message)} {note}</p>\n'


def _answer(request: Request, status: int, title: str, main: str, request_id: str) -> Response:
    home = text(_root(request) + PAGE_PATH)
    document = f"""<!DOCTYPE html>
<html lang="fr">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{text(title)} — fhir-bridge audit</title>
<style>{STYLE}</style>
</head>
<body>
<a class="skip" href="#contenu">Aller au contenu (skip to content)</a>
<header>
<p>fhir-bridge — Journal d'audit (audit trail)</p>
<nav aria-label="Navigation principale (main navigation)"><a href="{home}">Tous les échanges (all exchanges)</a></nav>
</header>
<main id="contenu">
{main}</main>
</body>
</html>
"""
    headers = {**_SECURITY_HEADERS, REQUEST_ID_HEADER: request_id}
    return Response(document.encode("utf-8"), status_code=status, media_type="text/html; charset=utf-8",
                     headers=headers)  # fmt: skip


def _root(request: Request) -> str:
    return str(request.scope.get("root_path") or "").rstrip("/")


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
        where = (f'<a href="{text(_root(request) + PAGE_PATH)}/{first}">N° {first}</a>' if first is not None
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


# ------------------------------------------------------------------------------------------------- the list

_FORM_FIELDS = ("from", "to", "patient", "agent", "subtype", "outcome")


async def _list(request: Request, view: _View) -> tuple[str, str]:
    given = {name: value.strip() for name, value in request.query_params.items() if name in (*_FORM_FIELDS,
             "count", "offset") and value.strip()}  # fmt: skip
    api = request.app.state.settings.api
    count = _int(given, "count", int(api.page_size), 1, int(api.max_page_size))
    offset = _int(given, "offset", 0, 0, _MAX_OFFSET)
    params: list[tuple[str, str]] = []
    if "from" in given:
        params.append(("date", "ge" + given["from"]))
    if "to" in given:
        params.append(("date", "le" + given["to"]))
    params += [(name, given[name]) for name in ("patient", "agent", "subtype", "outcome") if name in given]
    base = _root(request) + PAGE_PATH
    form = _form(base, given, count)
    filters = parse_audit_search(params)  # its InvalidInput (a bad date, a patient without system) answers 400
    patients = filters.get("patient") or []
    if len(patients) == 1:
        system, _, value = patients[0].partition("|")
        view.patient = PatientIdentifier(system, value)
    events, total = await audit_log(request).search(**filters, count=count, offset=offset)
    title = "Échanges enregistrés (recorded exchanges)"
    kept = [(k, v) for k, v in given.items() if k in _FORM_FIELDS]

    def page_link(at: int) -> str:
        return text(f"{base}?{urlencode([*kept, ('count', str(count)), ('offset', str(at))])}")

    shown = (f"{offset + 1}–{offset + len(events)}" if events else "aucun (none)")
    summary = (f'<p id="summary" data-total="{total}">{total} événement{"s" if total != 1 else ""} '
               f"(event{'s' if total != 1 else ''}) ; affichés (shown) : {shown}</p>\n")  # fmt: skip
    pager = []
    if offset > 0:
        pager.append(f'<a rel="prev" href="{page_link(max(0, offset - count))}">← Précédents (newer)</a>')
    if offset + count < total:
        pager.append(f'<a rel="next" href="{page_link(offset + count)}">Suivants (older) →</a>')
    nav = (f'<nav class="pager" aria-label="Pages de résultats (result pages)">{"".join(pager)}</nav>\n'
           if pager else "")  # fmt: skip
    rows = "".join(_row(base, event) for event in events)
    table = f"""<table id="events">
<caption>Échanges, du plus récent au plus ancien (exchanges, newest first)</caption>
<thead><tr><th scope="col">N° (seq)</th><th scope="col">Enregistré, UTC (recorded)</th><th scope="col">Type</th>
<th scope="col">Sous-type (subtype)</th><th scope="col">Action</th><th scope="col">Résultat (outcome)</th>
<th scope="col">Demandeur (requestor)</th><th scope="col">Patient</th><th scope="col">Objet (entity)</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
""" if events else '<p id="no-events">Aucun événement ne correspond (no matching event).</p>\n'
    return title, f"<h1>{text(title)}</h1>\n{form}{summary}{nav}{table}{nav}"


def _int(given: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in given:
        return default
    if not (given[name].isascii() and given[name].isdigit()):
        raise InvalidInput(f"{name} must be a non-negative integer", expression=[name])
    return max(low, min(high, int(given[name])))


def _form(base: str, given: dict[str, str], count: int) -> str:
    def field(name: str, label: str, kind: str = "text", extra: str = "") -> str:
        return (f'<div><label for="f-{name}">{text(label)}</label>'
                f'<input id="f-{name}" name="{name}" type="{kind}" value="{text(given.get(name, ""))}"{extra}>'
                "</div>")  # fmt: skip

    chosen = given.get("outcome", "")
    options = '<option value="">Tous (any)</option>' + "".join(
        f'<option value="{code}"{" selected" if chosen == code else ""}>{code} — {text(label)}</option>'
        for code, label in OUTCOME_LABELS.items())
    hints = "".join(f'<option value="{text(h)}"></option>' for h in _SUBTYPE_HINTS)
    return f"""<form method="get" action="{text(base)}" role="search" aria-label="Filtrer les échanges (filter)">
<fieldset><legend>Filtres (filters)</legend>
<div class="filters">
{field("from", "Du (from), UTC", "date")}
{field("to", "Au, inclus (to, inclusive), UTC", "date")}
{field("patient", "Patient, système|valeur (identifier SYSTEM|VALUE)", extra=' placeholder="urn:oid:1.2.250.1.213.1.4.8|…"')}
{field("agent", "Client ou agent (client / agent)")}
{field("subtype", "Sous-type (subtype)", extra=' list="subtypes"')}
<datalist id="subtypes">{hints}</datalist>
<div><label for="f-outcome">Résultat (outcome)</label><select id="f-outcome" name="outcome">{options}</select></div>
<div><label for="f-count">Par page (per page)</label><input id="f-count" name="count" type="number" min="1" value="{count}"></div>
<div><button type="submit">Filtrer (filter)</button> <a href="{text(base)}">Effacer (clear)</a></div>
</div>
</fieldset>
</form>
"""  # noqa: E501


def _row(base: str, event: dict[str, Any]) -> str:
    seq = str(event.get("id", ""))
    link = f'<a href="{text(base)}/{text(seq)}">{text(seq)}</a>' if seq.isascii() and seq.isdigit() else text(seq)
    outcome = str(event.get("outcome", ""))
    requestors = [_agent_name(a) for a in event.get("agent") or [] if isinstance(a, dict) and a.get("requestor")]
    objects = []
    for entity in event.get("entity") or []:
        if not isinstance(entity, dict) or _is_patient(entity):
            continue
        what = entity.get("what") or {}
        if "query" in entity:
            objects.append("requête (query)")
        elif what.get("reference"):
            objects.append(str(what["reference"]) + (f" ({entity['name']})" if entity.get("name") else ""))
        elif (entity.get("type") or {}).get("code") == "XrequestId":
            continue
        elif (what.get("identifier") or {}).get("value"):
            objects.append(str(what["identifier"]["value"]))
    cells = [
        _codings([event.get("type") or {}]),
        _codings(event.get("subtype") or []),
        text(ACTION_LABELS.get(str(event.get("action", "")), event.get("action", ""))),
        f'<span class="o{text(outcome)}">{text(OUTCOME_LABELS.get(outcome, outcome))}</span>'
        + (f'<br><span class="sys">{text(event["outcomeDesc"])}</span>' if event.get("outcomeDesc") else ""),
        "<br>".join(requestors),
        _patient_cell(event),
        "<br>".join(text(o) for o in objects),
    ]
    tds = "".join(f"<td>{cell}</td>" for cell in cells)
    return (f'<tr data-seq="{text(seq)}" data-outcome="{text(outcome)}"><th scope="row">{link}</th>'
            f"<td>{text(event.get('recorded', ''))}</td>{tds}</tr>\n")  # fmt: skip


def _codings(codings: list[Any]) -> str:
    shown = []
    for coding in codings:
        if isinstance(coding, dict) and coding.get("code") is not None:
            label = text(coding["code"])
            if coding.get("display"):
                label += f' <span class="sys">{text(coding["display"])}</span>'
            shown.append(f'<span class="code">{label}</span>')
    return "<br>".join(shown)


def _agent_name(agent: dict[str, Any]) -> str:
    ident = (agent.get("who") or {}).get("identifier") or {}
    name = text(ident.get("value", agent.get("name", "?")))
    address = (agent.get("network") or {}).get("address")
    return name + (f' <span class="sys">{text(address)}</span>' if address else "")


def _is_patient(entity: dict[str, Any]) -> bool:
    role = entity.get("role") or {}
    return role.get("system") == OBJECT_ROLE and role.get("code") == "1"


def _patient_cell(event: dict[str, Any]) -> str:
    for entity in event.get("entity") or []:
        if isinstance(entity, dict) and _is_patient(entity):
            ident = (entity.get("what") or {}).get("identifier") or {}
            return f'{text(ident.get("value", ""))}<br><span class="sys">{text(ident.get("system", ""))}</span>'
    return ""


# ----------------------------------------------------------------------------------------------- the detail


async def _detail(request: Request, view: _View, seq: int | None) -> tuple[str, str]:
    if seq is None:
        raise NotFound("no such AuditEvent")
    stored = await stored_event(request, seq)
    title = f"Événement N° {seq} (event #{seq})"
    back = f'<p><a href="{text(_root(request) + PAGE_PATH)}">Retour à la liste (back to the list)</a></p>\n'
    try:
        event = json.loads(stored)
    except (ValueError, UnicodeDecodeError):
        raw = stored.decode("utf-8", errors="replace")
        return title, (f"<h1>{text(title)}</h1>\n{back}<p role=\"alert\">Contenu stocké illisible : ce n'est pas du "
                       f"JSON (the stored content is not JSON).</p>\n<h2>Contenu brut (raw content)</h2>\n"
                       f'<pre id="raw-json">{text(raw)}</pre>\n')  # fmt: skip
    if not isinstance(event, dict):
        event = {"value": event}
    view.patient = resource_patient(event)
    parts = [f"<h1>{text(title)}</h1>\n", back]
    top = {k: v for k, v in event.items() if k not in ("agent", "entity", "source", "extension")}
    parts.append(_fields_table("summary", "Résumé (summary)", _ordered(top, "event")))
    for i, agent in enumerate(event.get("agent") or [], start=1):
        who = "demandeur (requestor)" if isinstance(agent, dict) and agent.get("requestor") else "(agent)"
        parts.append(_fields_table(f"agent-{i}", f"Agent {i} — {who}", _ordered(agent, "agent")))
    if "source" in event:
        source = _ordered(event["source"], "source")
        parts.append(_fields_table("source", "Source de l'enregistrement (audit source)", source))
    for i, entity in enumerate(event.get("entity") or [], start=1):
        parts.append(_fields_table(f"entity-{i}", f"Entité {i} (entity {i})", _ordered(entity, "entity")))
    link = chain_link(event)
    if link is not None:
        parts.append(_fields_table("chain", "Chaînage (chain link)", {"seq": link.seq, "prev": link.prev,
                                                                     "hash": link.hash}))  # fmt: skip
    others = [e for e in event.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == CHAIN_URL)]
    if others:
        parts.append(_fields_table("extensions", "Autres extensions (other extensions)", others))
    pretty = json.dumps(event, indent=2, ensure_ascii=False)
    parts.append(f'<h2 id="raw-h">JSON brut, tel que stocké (raw JSON as stored)</h2>\n'
                 f'<pre id="raw-json" aria-labelledby="raw-h"><code>{text(pretty)}</code></pre>\n')  # fmt: skip
    return title, "".join(parts)


def _ordered(value: Any, kind: str) -> Any:
    if not isinstance(value, dict):
        return value
    first = [k for k in _ORDER[kind] if k in value]
    return {k: value[k] for k in [*first, *(k for k in value if k not in first)]}


def _fields_table(ident: str, caption: str, value: Any) -> str:
    rows = []
    for path, leaf in _flatten(value):
        key = re.sub(r"\[\d+\]", "", path)
        label = FIELD_LABELS.get(key)
        shown = text(leaf)
        if key == "outcome" and leaf in OUTCOME_LABELS:
            shown += f" — {text(OUTCOME_LABELS[leaf])}"
        elif key == "action" and leaf in ACTION_LABELS:
            shown += f" — {text(ACTION_LABELS[leaf])}"
        elif key == "query":
            shown = f"<code>{shown}</code>" + _decoded_query(leaf)
        head = f"{text(label)} <code>{text(path)}</code>" if label else f"<code>{text(path)}</code>"
        rows.append(f'<tr><th scope="row">{head}</th><td data-path="{text(path)}">{shown}</td></tr>')
    body = "\n".join(rows) or '<tr><td colspan="2">—</td></tr>'
    thead = '<thead><tr><th scope="col">Champ (field)</th><th scope="col">Valeur (value)</th></tr></thead>'
    return (f'<table id="{text(ident)}">\n<caption>{text(caption)}</caption>\n{thead}\n'
            f"<tbody>\n{body}\n</tbody>\n</table>\n")  # fmt: skip


def _decoded_query(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return '<br><span class="sys">(pas du base64 valide, not valid base64)</span>'
    decoded = raw.decode("utf-8", errors="replace")
    return f'<br>Requête décodée (decoded query) :<pre class="query">{text(decoded)}</pre>'


def _flatten(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for key, item in value.items():
            out += _flatten(item, f"{path}.{key}" if path else str(key))
        return out
    if isinstance(value, list):
        return [row for i, item in enumerate(value) for row in _flatten(item, f"{path}[{i}]")] or [(path, "[]")]
    if isinstance(value, bool) or value is None:
        return [(path, json.dumps(value))]
    return [(path, str(value))]


# ---------------------------------------------------------------------------------------------- escaping


def text(value: object) -> str:
    """Any value as HTML text or attribute value: escaped (``& < > " '``), invisible characters made visible."""
    shown = _INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))
    return html.escape(shown, quote=True)
