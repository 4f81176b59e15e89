"""Issue 6 "Done when": schemathesis against the OpenAPI schema, with valid tokens, finds no 5xx.

The schema is the one the running API publishes (``/openapi.json``); every operation is called with generated
path parameters, queries and headers, once as each kind of client (a platform, a reviewer, an auditor, an
operator) with a real token from ``/auth/token``, and once with no token. Any 5xx fails the test; so does an
answer that is not JSON (every error is an OperationOutcome).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.e2e.conftest import Bridge

pytestmark = pytest.mark.e2e
ROLES = ("platform", "auditor", "operator")
HUNT = int(os.environ.get("FHIR_BRIDGE_FUZZ_EXAMPLES", "0"))


@pytest.fixture(scope="module")
def tokens(bridge: Bridge) -> dict[str, httpx.Auth]:
    reviewer = sorted(c for c in bridge.clients.clients if c.startswith("reviewer-"))[0]
    return {client: bridge.auth(client) for client in (*ROLES, reviewer)}


def test_no_operation_answers_5xx_whoever_calls(bridge: Bridge, tokens: dict[str, httpx.Auth]) -> None:
    """Driven by hand (schemathesis' pytest plugin does not support pytest 9 yet): each operation's strategy."""
    root = bridge.api.removesuffix("/fhir")
    api_schema = schemathesis.openapi.from_url(f"{root}/openapi.json")
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15, "the FHIR routes are in the schema"
    failures: list[str] = []
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=30) as http:
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=HUNT or 25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=not HUNT)  # reproducible in CI; FHIR_BRIDGE_FUZZ_EXAMPLES=200 to hunt at random
            def call(case: Any) -> None:
                for client, auth in [*tokens.items(), ("anonymous", None)]:
                    answer = _send(http, case, root, auth)
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    if answer.status_code >= 500:
                        failures.append(f"{client}: {case.method} {case.formatted_path} → {answer.status_code}")
                    elif answer.status_code >= 400 and answer.content:
                        kind = answer.headers.get("content-type", "").split(";")[0]
                        if kind not in ("application/fhir+json", "application/json", "application/fhir+xml"):
                            failures.append(f"{client}: {case.method} {case.formatted_path} answered {kind}")

            call()
    assert not failures, "\n".join(sorted(set(failures))[:30])
    assert sum(statuses.values()) >= 5 * len(operations), statuses
    assert statuses.get(200, 0) > 0 and statuses.get(401, 0) > 0, statuses  # valid tokens did get through
    print(f"{len(operations)} operations, answers by status: {dict(sorted(statuses.items()))}")


def _send(http: httpx.Client, case: Any, root: str, auth: httpx.Auth | None) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=root)
    request = http.build_request(kwargs.pop("method"), kwargs.pop("url"), headers=kwargs.pop("headers", None),
                                 params=kwargs.pop("params", None), content=_body(kwargs))
    if auth is None:
        return http.send(request)
    flow = auth.sync_auth_flow(request)  # the token request first when needed, then the call itself
    sent = next(flow)
    while True:
        answer = http.send(sent)
        try:
            sent = flow.send(answer)
        except StopIteration:
            return answer


def _body(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs:
        import json

        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data") or kwargs.get("content")
    return data if isinstance(data, bytes) else (data.encode() if isinstance(data, str) else None)
