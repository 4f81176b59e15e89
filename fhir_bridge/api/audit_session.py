"""Who may see the auditor's page (:mod:`fhir_bridge.api.audit_page`), and how a browser signs in.

* :func:`require_auditor`: only auditors, by a bridge access token (``Authorization: Bearer`` or the session
  cookie), verified by the security layer (:func:`fhir_bridge.api.security.context_from`);
* :func:`open_session` (``POST /audit/session``): the sign-in form's token, checked the same way, kept in an
  ``HttpOnly`` cookie (:data:`SESSION_COOKIE`) that lives no longer than the token.

Apart from the page's routes because this is the one part of the page that handles a credential.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from starlette.responses import RedirectResponse, Response

from fhir_bridge.access.tenancy import require_scope
from fhir_bridge.api.audit_html import ERROR_TITLES, LOGIN_FORM, PAGE_PATH, answer, error_main, root_path
from fhir_bridge.api.errors import status_for
from fhir_bridge.api.fhir_io import read_form
from fhir_bridge.api.security import bearer_token, context_from
from fhir_bridge.errors import BridgeError, Forbidden

__all__ = ["SESSION_COOKIE", "open_session", "require_auditor"]

SESSION_COOKIE = "fhir_bridge_audit"
_MAX_SESSION_FORM = 16 * 1024


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


async def open_session(request: Request) -> Response:
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
        title, main = error_main(status, ERROR_TITLES.get(status, "Erreur (error)"), exc.message)
        return answer(request, status, title, main + LOGIN_FORM, str(uuid.uuid4()))
    response = RedirectResponse(root_path(request) + PAGE_PATH, status_code=303)
    lifetime = max(1, int(who.expires_at - time.time())) if who.expires_at else 60
    response.set_cookie(SESSION_COOKIE, token, max_age=lifetime, path=PAGE_PATH, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https")
    response.headers["Cache-Control"] = "no-store"
    return response
