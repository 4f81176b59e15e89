"""The two views of the auditor's page (:mod:`fhir_bridge.api.audit_page`): what each reads from the audit log
and shows.

* :func:`list_view` (``GET /audit``): the filters (the form's fields as the AuditEvent search takes them,
  :func:`fhir_bridge.api.audit_routes.parse_audit_search`), one page of events newest first, the pager;
* :func:`detail_view` (``GET /audit/{seq}``): one stored event, every field in tables, its chain link, and the
  raw JSON as stored.

Each fills in the :class:`View` that the page records (the patient the view is about) as soon as it knows it,
so that a view refused half-way still names it. The HTML they share is :mod:`fhir_bridge.api.audit_html`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import Request

from fhir_bridge.api.audit_html import ACTION_LABELS, OUTCOME_LABELS, PAGE_PATH, fields_table, root_path, text
from fhir_bridge.api.audit_middleware import resource_patient
from fhir_bridge.api.audit_routes import audit_log, parse_audit_search, stored_event
from fhir_bridge.audit.chain import CHAIN_URL, chain_link
from fhir_bridge.audit.events import OBJECT_ROLE
from fhir_bridge.errors import InvalidInput, NotFound
from fhir_bridge.fhir.identity import PatientIdentifier

__all__ = ["View", "detail_view", "list_view"]

_MAX_OFFSET = 10_000_000
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


@dataclass(slots=True)
class View:
    """What the view's own AuditEvent says: filled in as the page is built."""

    interaction: str
    resource_id: str | None = None
    query: bytes | None = None
    patient: PatientIdentifier | None = None


# -------------------------------------------------------------------------------------------------- the list

_FORM_FIELDS = ("from", "to", "patient", "agent", "subtype", "outcome")


async def list_view(request: Request, view: View) -> tuple[str, str]:
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
    base = root_path(request) + PAGE_PATH
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


# ------------------------------------------------------------------------------------------------ the detail


async def detail_view(request: Request, view: View, seq: int | None) -> tuple[str, str]:
    if seq is None:
        raise NotFound("no such AuditEvent")
    stored = await stored_event(request, seq)
    title = f"Événement N° {seq} (event #{seq})"
    back = f'<p><a href="{text(root_path(request) + PAGE_PATH)}">Retour à la liste (back to the list)</a></p>\n'
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
    parts.append(fields_table("summary", "Résumé (summary)", _ordered(top, "event")))
    for i, agent in enumerate(event.get("agent") or [], start=1):
        who = "demandeur (requestor)" if isinstance(agent, dict) and agent.get("requestor") else "(agent)"
        parts.append(fields_table(f"agent-{i}", f"Agent {i} — {who}", _ordered(agent, "agent")))
    if "source" in event:
        source = _ordered(event["source"], "source")
        parts.append(fields_table("source", "Source de l'enregistrement (audit source)", source))
    for i, entity in enumerate(event.get("entity") or [], start=1):
        parts.append(fields_table(f"entity-{i}", f"Entité {i} (entity {i})", _ordered(entity, "entity")))
    link = chain_link(event)
    if link is not None:
        parts.append(fields_table("chain", "Chaînage (chain link)", {"seq": link.seq, "prev": link.prev,
                                                                    "hash": link.hash}))  # fmt: skip
    others = [e for e in event.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == CHAIN_URL)]
    if others:
        parts.append(fields_table("extensions", "Autres extensions (other extensions)", others))
    pretty = json.dumps(event, indent=2, ensure_ascii=False)
    parts.append(f'<h2 id="raw-h">JSON brut, tel que stocké (raw JSON as stored)</h2>\n'
                 f'<pre id="raw-json" aria-labelledby="raw-h"><code>{text(pretty)}</code></pre>\n')  # fmt: skip
    return title, "".join(parts)


def _ordered(value: Any, kind: str) -> Any:
    if not isinstance(value, dict):
        return value
    first = [k for k in _ORDER[kind] if k in value]
    return {k: value[k] for k in [*first, *(k for k in value if k not in first)]}
