"""The auditor web page (issue 7 item 4) in a real headless Chromium, against a real bridge.

redis-server, ``fhir-bridge serve`` and a worker against the session sandbox; a case is submitted and
collected, a call is refused (404), a hostile call is made (markup in its X-Request-Id and its query). Then
Chromium (the Debian ``chromium`` package, no driver: ``--dump-dom`` and ``--screenshot``) loads the page:
the list shows the exchanges newest first, the filters narrow it, one event's detail shows every field and the
raw JSON as the API serves it, hostile values are text and never markup, the chain status says verified and,
once a stored event is tampered with, broken at its seq. Every view of the page is itself on the record.

The page is for auditors only. The browser signs in as a person would: a local HTML page posts the auditor
client's access token to ``POST /audit/session`` (a script submits the form on load; ``--virtual-time-budget``
lets the 303 to ``/audit`` be followed before the dump), and the HttpOnly session cookie it gets is kept in the
browser profile, which the following runs reuse. Without a session the page answers 401 with the sign-in form;
a platform's token is refused 403.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import lxml.html
import pytest

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.audit.events import JTI_PREFIX
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge
from tests.e2e.test_exchange import FHIR, wait_task

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="the auditor page is tested in Chromium, and no chromium is on PATH "
                                                "(Debian: apt-get install chromium)"),
]  # fmt: skip
BROWSER_SECONDS = 60  # one page load, whole browser included
SESSION_SECONDS = 180  # sign in again after this: the session cookie lives as long as its token (at most 300 s)
SIGN_IN = "//form[@action='/audit/session']//textarea[@name='access_token']"
HOSTILE_ID = "<script>alert('x-request-id')</script>"
HOSTILE_QUERY = "focus=<img/src=x/onerror=alert(1)>&_x=\"'><b>bold</b>"
EV = "fhir-bridge:{audit}:ev"


class Chromium:
    """Headless Chromium, one short-lived browser per page. Signed in, the runs share one profile (it keeps the
    session cookie); otherwise each run has a fresh profile, without any session."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.profile: Path | None = None
        self.signed_at = 0.0
        self.sign_in_again: Callable[[], Page] | None = None
        self.signed_in: Page | None = None  # the page the first sign-in showed

    def run(self, url: str, *action: str, session: bool = True) -> tuple[str, str]:
        if session and self.sign_in_again is not None and time.monotonic() - self.signed_at > SESSION_SECONDS:
            self.sign_in_again()
        keep = self.profile if session else None
        profile = keep or Path(tempfile.mkdtemp(prefix="profile-", dir=self.work))
        assert CHROMIUM is not None
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                   "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}",
                   *action, url]  # fmt: skip
        # its own session: on a timeout the whole browser (renderer, zygote, GPU process) goes, not just the parent
        env = {**os.environ, "HOME": str(self.work)}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env=env) as browser:
            try:
                out, err = browser.communicate(timeout=BROWSER_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.communicate()
                raise AssertionError(f"chromium did not load {url} within {BROWSER_SECONDS} s") from None
            finally:
                if keep is None:
                    shutil.rmtree(profile, ignore_errors=True)
        assert browser.returncode == 0, f"chromium exited {browser.returncode}: {err[-2000:]}"
        return out, err

    def dom(self, url: str, *, session: bool = True) -> Page:
        out, err = self.run(url, "--dump-dom", session=session)
        return Page(lxml.html.fromstring(out), out, err)

    def screenshot(self, url: str, path: Path) -> None:
        self.run(url, f"--screenshot={path}", "--window-size=1280,1600", "--hide-scrollbars")

    def post_token(self, session_url: str, token: str, *, session: bool) -> Page:
        """Submit ``token`` to the page's sign-in endpoint as its form does and follow the answer (the 303 to the
        list, or a refusal); ``session``: in the kept profile, where the cookie stays."""
        form = self.work / f"sign-in-{time.monotonic_ns()}.html"
        markup = ('<!DOCTYPE html><html><body><form method="post" action="' + html_attr(session_url) + '">'
                  '<input type="hidden" name="access_token" value="' + html_attr(token) + '"></form>'
                  "<script>document.forms[0].submit()</script></body></html>")  # fmt: skip
        with os.fdopen(os.open(form, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as page:  # a token inside
            page.write(markup)
        try:
            out, err = self.run(form.as_uri(), "--virtual-time-budget=10000", "--dump-dom", session=session)
        finally:
            form.unlink()
        return Page(lxml.html.fromstring(out), out, err)

    def sign_in(self, session_url: str, token: Callable[[], str]) -> Page:
        """Open an auditor session in a kept profile; again every :data:`SESSION_SECONDS`, with a fresh token."""

        def again() -> Page:
            if self.profile is None:
                self.profile = Path(tempfile.mkdtemp(prefix="session-", dir=self.work))
            self.signed_at = time.monotonic()
            return self.post_token(session_url, token(), session=True)

        self.sign_in_again = again
        self.signed_in = again()
        return self.signed_in


def html_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


class Page:
    def __init__(self, tree: Any, source: str, log: str) -> None:
        self.tree, self.source, self.log = tree, source, log

    def one(self, xpath: str) -> Any:
        [found] = self.tree.xpath(xpath)
        return found

    def text(self, xpath: str) -> str:
        return " ".join(self.one(xpath).text_content().split())

    @property
    def chain(self) -> Any:
        return self.one('//section[@id="chain-status"]')

    @property
    def total(self) -> int:
        return int(self.one('//p[@id="summary"]').get("data-total"))

    def rows(self) -> list[dict[str, Any]]:
        """The list's rows: seq, outcome and each cell's text by column header."""
        headers = [" ".join(th.text_content().split()) for th in self.tree.xpath('//table[@id="events"]/thead//th')]
        rows = []
        for tr in self.tree.xpath('//table[@id="events"]/tbody/tr'):
            cells = [" ".join(c.text_content().split()) for c in tr.xpath("./th|./td")]
            rows.append({"seq": int(tr.get("data-seq")), "outcome": tr.get("data-outcome"),
                         **dict(zip(headers, cells, strict=True))})  # fmt: skip
        return rows


def fresh_token(bridge: Bridge, client_id: str) -> str:
    """A new access token of ``client_id`` from the bridge's token endpoint (its whole lifetime ahead)."""
    auth = bridge.clients.auth(client_id, bridge.api)
    with httpx.Client(timeout=30) as client:
        return auth.take_token_response(client.send(auth.token_request()))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, paged: Bridge) -> Iterator[Chromium]:
    """Chromium signed in as the auditor client, through the page's own session endpoint."""
    chromium = Chromium(tmp_path_factory.mktemp("chromium"))
    chromium.sign_in(page_url(paged, "/session"), lambda: fresh_token(paged, "auditor"))
    yield chromium
    if chromium.profile is not None:
        shutil.rmtree(chromium.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def auditor(paged: Bridge) -> Iterator[httpx.Client]:
    """The auditor client: the FHIR AuditEvent API, and the page with ``Authorization: Bearer`` (as tools do)."""
    with paged.client("auditor") as client:
        yield client


@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Iterator[Bridge]:
    data_dir = tmp_path_factory.mktemp("audit-page")
    with EmbeddedRedis(data_dir) as redis, ProcessGroup(data_dir / "logs") as group:
        bridge = start_bridge(group, redis, sandbox.url, data_dir, "page", FHIR_BRIDGE_AUDIT__CHECKPOINT_EVERY="5")
        bridge.start_worker("page-worker")
        yield bridge


def page_url(bridge: Bridge, path: str = "") -> str:
    return bridge.api.removesuffix("/fhir") + "/audit" + path


@pytest.fixture(scope="module")
def case(paged: Bridge, sandbox: Sandbox) -> dict[str, Any]:
    """A submitted and collected case, a refused call and a hostile one, all on the record (by the platform)."""
    api = paged.api
    patient = sandbox.world()["patients"][0]
    with paged.client("platform") as platform:
        body = json.dumps(second_opinion_request(patient, "PAGE-1"))
        created = platform.post(f"{api}/ServiceRequest", content=body, headers={
            **FHIR, "If-None-Exist": "identifier=https://platform.example/requests|PAGE-1"})
        assert created.status_code == 201, created.text
        task = wait_task(platform, api, created.json()["id"])
        assert task["status"] == "ready", task.get("statusReason")
        assert platform.get(f"{api}/Task/no-such-task", timeout=10).status_code == 404
    # raw markup in the request target and the X-Request-Id, as a hostile client sends them (no client encoding)
    address = urlsplit(api)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=10)
    connection.request("GET", f"/fhir/Task?{HOSTILE_QUERY}", headers={
        "X-Request-Id": HOSTILE_ID, "Authorization": f"Bearer {fresh_token(paged, 'platform')}"})
    hostile = connection.getresponse()
    hostile.read()
    connection.close()
    assert hostile.getheader("X-Request-Id") == HOSTILE_ID
    identifier = patient["identifier"]
    return {"patient": patient, "token": f"{identifier['system']}|{identifier['value']}", "task": task,
            "hostile_status": hostile.status}  # fmt: skip


def events(auditor: httpx.Client, api: str, **params: str) -> list[dict[str, Any]]:
    answer = auditor.get(f"{api}/AuditEvent", params={"_count": "200", **params}, timeout=30)
    bundle = answer.raise_for_status().json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def test_the_list_shows_the_exchanges_of_the_case_newest_first_and_the_chain_verified(
        case: dict[str, Any], paged: Bridge, browser: Chromium, tmp_path: Path) -> None:  # fmt: skip
    page = browser.dom(page_url(paged, "?count=200"))
    rows = page.rows()
    assert page.chain.get("data-status") == "verified", page.text('//section[@id="chain-status"]')
    assert "Chaîne vérifiée (chain verified)" in page.text('//section[@id="chain-status"]')
    assert len(rows) == page.total > 10
    seqs = [row["seq"] for row in rows]
    assert seqs == sorted(seqs, reverse=True) and seqs[-1] == 1  # newest first, all of them
    subtypes = " ".join(row["Sous-type (subtype)"] for row in rows)
    for code in ("create", "ITI-78", "ITI-67", "ITI-68", "collecting"):
        assert code in subtypes
    iti67 = next(row for row in rows if "ITI-67" in row["Sous-type (subtype)"])
    assert case["patient"]["identifier"]["value"] in iti67["Patient"]
    assert iti67["Demandeur (requestor)"].startswith("fhir-bridge")
    # the page is accessible markup: a language, a caption, column headers, a label for every field
    assert page.one("/html").get("lang") == "fr"
    assert page.text('//table[@id="events"]/caption').startswith("Échanges")
    assert all(th.get("scope") == "col" for th in page.tree.xpath('//table[@id="events"]/thead//th'))
    for field in page.tree.xpath("//form//input|//form//select"):
        assert page.tree.xpath(f'//label[@for="{field.get("id")}"]'), field.get("name")
    assert {f.get("name") for f in page.tree.xpath("//form//input|//form//select")} >= {
        "from", "to", "patient", "agent", "subtype", "outcome"}
    # the CSP lets the page's own stylesheet in (its hash is right): Chromium logs a violation to the console
    assert "Content Security Policy" not in page.log
    shot = tmp_path / "audit.png"
    browser.screenshot(page_url(paged), shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_filters_narrow_the_list(case: dict[str, Any], paged: Bridge, browser: Chromium) -> None:
    everything = browser.dom(page_url(paged)).total
    iti67 = browser.dom(page_url(paged, "?subtype=ITI-67&count=200"))
    assert 0 < iti67.total < everything
    assert all("ITI-67" in row["Sous-type (subtype)"] for row in iti67.rows())
    refused = browser.dom(page_url(paged, "?outcome=4&count=200"))
    assert 0 < refused.total < everything
    assert all(row["outcome"] == "4" for row in refused.rows())
    assert any("Task/no-such-task" in row["Objet (entity)"] for row in refused.rows())
    selected = refused.tree.xpath('//select[@name="outcome"]/option[@selected]')
    assert [o.get("value") for o in selected] == ["4"]  # the form shows the filter in force
    nir = case["patient"]["identifier"]["value"]
    patient = browser.dom(page_url(paged, f"?patient={case['token']}&count=200"))
    assert 0 < patient.total < everything and all(nir in row["Patient"] for row in patient.rows())
    platform = browser.dom(page_url(paged, "?agent=platform&subtype=read&count=200"))
    assert platform.total > 0  # the calls of the platform client, named by its token
    assert all(row["Demandeur (requestor)"].startswith("platform") and "read" in row["Sous-type (subtype)"]
               for row in platform.rows())  # fmt: skip
    today = datetime.now(UTC).date()
    assert browser.dom(page_url(paged, f"?from={today + timedelta(days=1)}")).tree.xpath('//p[@id="no-events"]')
    assert browser.dom(page_url(paged, f"?to={today - timedelta(days=1)}")).tree.xpath('//p[@id="no-events"]')
    assert browser.dom(page_url(paged, f"?from={today}&to={today}")).total > 0
    # paging, over a window closed now: the views recorded meanwhile (these very pages) do not shift it
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    first = browser.dom(page_url(paged, f"?to={now}&count=2"))
    assert len(first.rows()) == 2 and not first.tree.xpath('//a[@rel="prev"]')
    following = first.one('(//nav[@class="pager"])[1]/a[@rel="next"]').get("href")
    assert "offset=2" in following and "count=2" in following
    second = browser.dom(paged.api.removesuffix("/fhir") + following)
    assert [r["seq"] for r in second.rows()] == [r["seq"] - 2 for r in first.rows()]
    assert second.total == first.total and second.tree.xpath('//a[@rel="prev"]')


def test_the_detail_shows_every_field_and_the_raw_json(case: dict[str, Any], paged: Bridge, browser: Chromium,
                                                       auditor: httpx.Client) -> None:  # fmt: skip
    [event] = events(auditor, paged.api, subtype="ITI-67", _count="1")
    page = browser.dom(page_url(paged, f"/{event['id']}"))
    assert page.chain.get("data-status") == "verified"
    assert page.text("//h1") == f"Événement N° {event['id']} (event #{event['id']})"
    shown = json.loads(page.one('//pre[@id="raw-json"]').text_content())
    assert shown == event  # the stored JSON, as the FHIR API serves it
    cells = {td.get("data-path"): " ".join(td.text_content().split()) for td in page.tree.xpath("//td[@data-path]")}
    for i, agent in enumerate(event["agent"], start=1):
        table = page.tree.xpath(f'//table[@id="agent-{i}"]//td[@data-path]')
        assert {td.get("data-path") for td in table} == set(leaves(agent))
    for i, entity in enumerate(event["entity"], start=1):
        table = page.tree.xpath(f'//table[@id="entity-{i}"]//td[@data-path]')
        assert {td.get("data-path") for td in table} == set(leaves(entity))
    assert cells["outcome"] == "0 — Succès (success)"
    assert cells["recorded"] == event["recorded"]
    query = page.one('//pre[@class="query"]').text_content()
    assert query.startswith("GET ") and "/DocumentReference?" in query
    assert case["patient"]["identifier"]["value"] in page.text('(//table[starts-with(@id, "entity-")])[1]')


def test_hostile_values_are_shown_as_text_and_never_run(case: dict[str, Any], paged: Bridge, browser: Chromium,
                                                        auditor: httpx.Client) -> None:  # fmt: skip
    [event] = [e for e in events(auditor, paged.api, subtype="search-type")
               if any(x.get("what", {}).get("identifier", {}).get("value") == HOSTILE_ID for x in e["entity"])]
    listed = browser.dom(page_url(paged, "?subtype=search-type&count=200"))
    detail = browser.dom(page_url(paged, f"/{event['id']}"))
    for page in (listed, detail):
        assert not page.tree.xpath("//script|//img|//b|//*[@onerror]")  # nothing the attacker wrote became markup
    assert HOSTILE_ID in detail.text("//body")
    assert f"GET /fhir/Task?{HOSTILE_QUERY}" in detail.one('//pre[@class="query"]').text_content()
    assert json.loads(detail.one('//pre[@id="raw-json"]').text_content()) == event


def _check_security_headers(paged: Bridge, client: httpx.Client) -> None:
    for path in ("", "/1", "/999999", "?outcome=7"):
        answer = client.get(page_url(paged, path), timeout=30)
        assert answer.headers["content-type"] == "text/html; charset=utf-8"
        policy = answer.headers["content-security-policy"]
        assert policy.startswith("default-src 'none';") and "script-src" not in policy
        assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-request-id"]


def test_the_answers_forbid_scripts_frames_and_caches(case: dict[str, Any], paged: Bridge,
                                                      auditor: httpx.Client) -> None:  # fmt: skip
    with httpx.Client() as nobody:
        _check_security_headers(paged, auditor)
        _check_security_headers(paged, nobody)  # the refusals (no session: 401) carry them too
    assert auditor.get(page_url(paged, "/999999"), timeout=30).status_code == 404
    assert auditor.get(page_url(paged, "/abc"), timeout=30).status_code == 404
    refused = auditor.get(page_url(paged, "?outcome=7"), timeout=30)
    assert refused.status_code == 400 and "outcome is one of 0, 4, 8, 12" in refused.text
    assert auditor.get(page_url(paged, "?patient=no-system"), timeout=30).status_code == 400
    assert auditor.get(page_url(paged, "?from=yesterday"), timeout=30).status_code == 400


def test_without_a_session_the_page_asks_to_sign_in_and_shows_nothing(case: dict[str, Any], paged: Bridge,
                                                                      browser: Chromium) -> None:  # fmt: skip
    nir = case["patient"]["identifier"]["value"]
    for path in ("", "/1", f"?patient={case['token']}"):
        answer = httpx.get(page_url(paged, path), timeout=30)
        assert answer.status_code == 401 and "chain-status" not in answer.text and nir not in answer.text
    page = browser.dom(page_url(paged), session=False)  # a browser without the cookie
    assert page.tree.xpath(SIGN_IN) and page.text("//h1").startswith("Authentification requise")
    assert not page.tree.xpath('//table[@id="events"]|//section[@id="chain-status"]')
    assert "Content Security Policy" not in page.log  # the sign-in form is the page's own: CSP form-action 'self'


def test_a_platform_token_is_refused_403_and_opens_no_session(case: dict[str, Any], paged: Bridge,
                                                              browser: Chromium) -> None:  # fmt: skip
    platform = fresh_token(paged, "platform")
    answer = httpx.get(page_url(paged), headers={"Authorization": f"Bearer {platform}"}, timeout=30)
    assert answer.status_code == 403 and "chain-status" not in answer.text
    opened = httpx.post(page_url(paged, "/session"), data={"access_token": platform}, timeout=30)
    assert opened.status_code == 403 and "set-cookie" not in opened.headers
    # in the browser: the sign-in refused, and still no page for that browser afterwards
    refused = browser.post_token(page_url(paged, "/session"), platform, session=False)
    assert refused.text("//h1").startswith("Accès réservé aux auditeurs") and refused.tree.xpath(SIGN_IN)
    assert not refused.tree.xpath('//table[@id="events"]')


def test_the_auditor_signs_in_through_the_session_form(case: dict[str, Any], paged: Bridge, browser: Chromium,
                                                       auditor: httpx.Client) -> None:  # fmt: skip
    signed_in = browser.signed_in
    assert signed_in is not None  # the 303 was followed to the list, shown with the cookie just set
    assert signed_in.chain.get("data-status") == "verified" and signed_in.total > 0
    assert not signed_in.tree.xpath(SIGN_IN)
    views = [e for e in events(auditor, paged.api, agent="auditor", subtype="search-type")
             if any(a["network"]["address"].endswith("/audit") for a in e["agent"] if not a["requestor"])]
    first = views[-1]  # newest first: the last is the sign-in's own view of the list, by the auditor's client id
    assert first["outcome"] == "0"
    assert base64.b64decode(next(x["query"] for x in first["entity"] if "query" in x)) == b"GET /audit"


def test_every_view_of_the_page_is_on_the_record(case: dict[str, Any], paged: Bridge, browser: Chromium,
                                                 auditor: httpx.Client) -> None:  # fmt: skip
    [shown] = events(auditor, paged.api, subtype="ITI-68", _count="1")
    browser.dom(page_url(paged, f"/{shown['id']}"))
    [read] = [e for e in events(auditor, paged.api, entity=f"AuditEvent/{shown['id']}")
              if e["subtype"][0]["code"] == "read"]
    assert read["outcome"] == "0"
    bridge_agent = next(a for a in read["agent"] if not a["requestor"])
    assert bridge_agent["network"]["address"].endswith("/audit")  # the page, not the FHIR API
    viewer = next(a for a in read["agent"] if a["requestor"])
    assert viewer["who"]["identifier"]["value"] == "auditor"  # who looked, with the token's jti
    assert viewer["policy"][0].startswith(JTI_PREFIX) and len(viewer["policy"]) == 1
    nir = case["patient"]["identifier"]["value"]
    assert any(x.get("what", {}).get("identifier", {}).get("value") == nir for x in read["entity"])  # whose data
    listed = auditor.get(page_url(paged), params={"patient": case["token"], "subtype": "ITI-67"},
                         headers={"X-Request-Id": "page-view-1"}, timeout=30)  # fmt: skip
    assert listed.status_code == 200 and listed.headers["x-request-id"] == "page-view-1"
    bad = auditor.get(page_url(paged, "?outcome=7"), headers={"X-Request-Id": "page-view-2"}, timeout=30)
    assert bad.status_code == 400
    anonymous = httpx.get(page_url(paged), headers={"X-Request-Id": "page-view-3"}, timeout=30)
    assert anonymous.status_code == 401
    recent = events(auditor, paged.api, subtype="search-type", _count="20")
    by_request = {x["what"]["identifier"]["value"]: e for e in recent for x in e["entity"]
                  if x.get("type", {}).get("code") == "XrequestId"}  # fmt: skip
    view = by_request["page-view-1"]
    query = base64.b64decode(next(x["query"] for x in view["entity"] if "query" in x)).decode()
    assert query.startswith("GET /audit?patient=") and "subtype=ITI-67" in query
    assert any(x.get("what", {}).get("identifier", {}).get("value") == nir for x in view["entity"])
    assert by_request["page-view-2"]["outcome"] == "4"
    assert "outcome" in by_request["page-view-2"]["outcomeDesc"]
    refused = by_request["page-view-3"]  # a refused view is on the record, by an anonymous caller
    assert refused["outcome"] == "4"
    assert next(a for a in refused["agent"] if a["requestor"])["who"]["identifier"]["value"] == "anonymous"


def test_a_tampered_event_shows_the_chain_broken_at_its_seq(case: dict[str, Any], paged: Bridge,
                                                             browser: Chromium) -> None:  # fmt: skip
    """Last: it breaks this bridge's chain for good."""
    import redis

    client = redis.Redis.from_url(paged.redis_url)
    member = f"{3:015d}"
    stored = json.loads(client.hget(EV, member))  # type: ignore[arg-type]
    stored["outcome"] = "8" if stored["outcome"] != "8" else "0"
    client.hset(EV, member, json.dumps(stored, separators=(",", ":"), sort_keys=True))
    client.close()
    page = browser.dom(page_url(paged))
    assert page.chain.get("data-status") == "broken"
    assert page.chain.get("data-first-broken") == "3"
    status = page.text('//section[@id="chain-status"]')
    assert "Chaîne rompue (chain broken)" in status and "first broken seq 3" in status
    assert page.one('//section[@id="chain-status"]//a').get("href") == "/audit/3"


def leaves(value: Any, path: str = "") -> list[str]:
    """The paths of every leaf of a JSON value, as the detail page names them."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in leaves(item, f"{path}.{key}" if path else key)]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in leaves(item, f"{path}[{i}]")] or [path]
    return [path]
