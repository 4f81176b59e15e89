"""The HTML every view of the auditor's page shares (:mod:`fhir_bridge.api.audit_page`).

**Every value is escaped** (:func:`text`): client ids, X-Request-Ids, raw queries and outcome descriptions are
what callers sent us. Control and bidirectional-override characters are shown as ``\\uXXXX`` so that a value can
neither hide nor reorder what the auditor reads. The answers (:func:`answer`, the document around every view)
carry a strict Content-Security-Policy (:data:`CONTENT_SECURITY_POLICY`: no script at all, the one inline
stylesheet :data:`STYLE` allowed by its hash), ``X-Frame-Options: DENY``, ``Cache-Control: no-store`` and
``Referrer-Policy: no-referrer`` (the URLs hold patient identifiers).

Also here: the error answers (:func:`error_main`, :data:`ERROR_TITLES`) and the sign-in form
(:data:`LOGIN_FORM`) shown with a refusal, the labels an auditor reads (:data:`OUTCOME_LABELS`,
:data:`ACTION_LABELS`, :data:`FIELD_LABELS`) and a table of an event's fields (:func:`fields_table`). What is
particular to the list or the detail is in :mod:`fhir_bridge.api.audit_views`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
import re
from typing import Any

from fastapi import Request
from starlette.responses import Response

from fhir_bridge.api.audit_middleware import REQUEST_ID_HEADER

__all__ = ["ACTION_LABELS", "CONTENT_SECURITY_POLICY", "ERROR_TITLES", "FIELD_LABELS", "LOGIN_FORM",
           "OUTCOME_LABELS", "PAGE_PATH", "STYLE", "answer", "error_main", "fields_table", "root_path",
           "text"]  # fmt: skip

PAGE_PATH = "/audit"
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


ERROR_TITLES = {400: "Filtre invalide (invalid filter)", 401: "Authentification requise (authentication required)",
                403: "Accès réservé aux auditeurs (auditors only)", 404: "Événement introuvable (no such event)",
                410: "Événement purgé par la rétention (removed by the retention policy)"}  # fmt: skip


def error_main(status: int, title: str, message: str) -> tuple[str, str]:
    """``(title, main)`` of an error answer: the title and the message, escaped, with the HTTP status."""
    note = f'<span class="sys">(HTTP {status})</span>'
    return title, f'<h1>{text(title)}</h1>\n<p role="alert">{text(message)} {note}</p>\n'


LOGIN_FORM = (f'<form method="post" action="{PAGE_PATH}/session"><p><label for="t">Jeton d\'accès auditeur '
              '(auditor access token)</label><br><textarea id="t" name="access_token" rows="4" cols="80" '
              'autocomplete="off" spellcheck="false" required></textarea></p>'
              '<p><button type="submit">Ouvrir la session (sign in)</button></p></form>\n'
              '<p class="sys">fhir-bridge clients token --id &lt;auditor&gt; --key &lt;private JWK&gt; '
              '--scope system/AuditEvent.rs</p>\n')


def answer(request: Request, status: int, title: str, main: str, request_id: str) -> Response:
    """The page's document around ``main``, with the headers that confine it and the view's X-Request-Id."""
    home = text(root_path(request) + PAGE_PATH)
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


def root_path(request: Request) -> str:
    """Where the app is mounted (the ASGI ``root_path``, empty at the root), without its last slash."""
    return str(request.scope.get("root_path") or "").rstrip("/")


# ----------------------------------------------------------------------------------------- a table of fields


def fields_table(ident: str, caption: str, value: Any) -> str:
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
