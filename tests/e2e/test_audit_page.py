"""The auditor web page (issue 7 item 4) in a real headless Chromium, against a real bridge.

redis-server, ``fhir-bridge serve`` and a worker against the session sandbox; a case is submitted and
collected, a call is refused (404), a hostile call is made (markup in its X-Request-Id and its query). Then
Chromium (the Debian ``chromium`` package, no driver: ``--dump-dom`` and ``--screenshot``) loads the page:
the list shows the exchanges newest first, the filters narrow it, one event's detail shows every field and the
raw JSON as the API serves it, hostile values are text and never markup, the chain status says verified and,
once a stored event is tampered with, broken at its seq. Every view of the page is itself on the record.
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
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import lxml.html
import pytest

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.demo import second_opinion_request
from fhir_bridge.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge
from tests.e2e.test_exchange import FHIR, wait_task

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="the auditor page is tested in Chromium, and no chromium is on PATH "
                                                "(Debian: apt-get install chromium)"),
]  # fmt: skip
BROWSER_SECONDS = 60  # one page load, whole browser included
HOSTILE_ID = "<script>alert('x-request-id')</script>"
HOSTILE_QUERY = "focus=<img/src=x/onerror=alert(1)>&_x=\"'><b>bold</b>"
EV = "fhir-bridge:{audit}:ev"


class Chromium:
    """Headless Chromium, one short-lived browser per page; its profile in a fresh directory each time."""

    def __init__(self, work: Path) -> None:
        self.work = work

    def run(self, url: str, *action: str) -> tuple[str, str]:
        profile = tempfile.mkdtemp(prefix="profile-", dir=self.work)
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
                shutil.rmtree(profile, ignore_errors=True)
        assert browser.returncode == 0, f"chromium exited {browser.returncode}: {err[-2000:]}"
        return out, err

    def dom(self, url: str) -> Page:
        out, err = self.run(url, "--dump-dom")
        return Page(lxml.html.fromstring(out), out, err)

    def screenshot(self, url: str, path: Path) -> None:
        self.run(url, f"--screenshot={path}", "--window-size=1280,1600", "--hide-scrollbars")


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


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Chromium:
    return Chromium(tmp_path_factory.mktemp("chromium"))


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
    """A submitted and collected case, a refused call and a hostile one, all on the record."""
    api = paged.api
    patient = sandbox.world()["patients"][0]
    created = httpx.post(f"{api}/ServiceRequest", content=json.dumps(second_opinion_request(patient, "PAGE-1")),
                         headers={**FHIR, "If-None-Exist": "identifier=https://platform.example/requests|PAGE-1"},
                         timeout=30)  # fmt: skip
    assert created.status_code == 201, created.text
    task = wait_task(api, created.json()["id"])
    assert task["status"] == "ready", task.get("statusReason")
    assert httpx.get(f"{api}/Task/no-such-task", timeout=10).status_code == 404
    # raw markup in the request target and the X-Request-Id, as a hostile client sends them (no client encoding)
    address = urlsplit(api)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=10)
    connection.request("GET", f"/fhir/Task?{HOSTILE_QUERY}", headers={"X-Request-Id": HOSTILE_ID})
    hostile = connection.getresponse()
    hostile.read()
    connection.close()
    assert hostile.getheader("X-Request-Id") == HOSTILE_ID
    identifier = patient["identifier"]
    return {"patient": patient, "token": f"{identifier['system']}|{identifier['value']}", "task": task,
            "hostile_status": hostile.status}  # fmt: skip


def events(api: str, **params: str) -> list[dict[str, Any]]:
    bundle = httpx.get(f"{api}/AuditEvent", params={"_count": "200", **params}, timeout=30).raise_for_status().json()
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
    anonymous = browser.dom(page_url(paged, "?agent=anonymous&subtype=read&count=200"))
    assert anonymous.total > 0
    assert all(row["Demandeur (requestor)"].startswith("anonymous") and "read" in row["Sous-type (subtype)"]
               for row in anonymous.rows())  # fmt: skip
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


def test_the_detail_shows_every_field_and_the_raw_json(case: dict[str, Any], paged: Bridge,
                                                       browser: Chromium) -> None:  # fmt: skip
    [event] = events(paged.api, subtype="ITI-67", _count="1")
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


def test_hostile_values_are_shown_as_text_and_never_run(case: dict[str, Any], paged: Bridge,
                                                        browser: Chromium) -> None:  # fmt: skip
    [event] = [e for e in events(paged.api, subtype="search-type")
               if any(x.get("what", {}).get("identifier", {}).get("value") == HOSTILE_ID for x in e["entity"])]
    listed = browser.dom(page_url(paged, "?subtype=search-type&count=200"))
    detail = browser.dom(page_url(paged, f"/{event['id']}"))
    for page in (listed, detail):
        assert not page.tree.xpath("//script|//img|//b|//*[@onerror]")  # nothing the attacker wrote became markup
    assert HOSTILE_ID in detail.text("//body")
    assert f"GET /fhir/Task?{HOSTILE_QUERY}" in detail.one('//pre[@class="query"]').text_content()
    assert json.loads(detail.one('//pre[@id="raw-json"]').text_content()) == event


def test_the_answers_forbid_scripts_frames_and_caches(case: dict[str, Any], paged: Bridge) -> None:
    for path in ("", "/1", "/999999", "?outcome=7"):
        answer = httpx.get(page_url(paged, path), timeout=30)
        assert answer.headers["content-type"] == "text/html; charset=utf-8"
        policy = answer.headers["content-security-policy"]
        assert policy.startswith("default-src 'none';") and "script-src" not in policy
        assert "frame-ancestors 'none'" in policy and "'unsafe-inline'" not in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-request-id"]
    assert httpx.get(page_url(paged, "/999999"), timeout=30).status_code == 404
    assert httpx.get(page_url(paged, "/abc"), timeout=30).status_code == 404
    refused = httpx.get(page_url(paged, "?outcome=7"), timeout=30)
    assert refused.status_code == 400 and "outcome is one of 0, 4, 8, 12" in refused.text
    assert httpx.get(page_url(paged, "?patient=no-system"), timeout=30).status_code == 400
    assert httpx.get(page_url(paged, "?from=yesterday"), timeout=30).status_code == 400


def test_every_view_of_the_page_is_on_the_record(case: dict[str, Any], paged: Bridge, browser: Chromium) -> None:
    [shown] = events(paged.api, subtype="ITI-68", _count="1")
    browser.dom(page_url(paged, f"/{shown['id']}"))
    [read] = [e for e in events(paged.api, entity=f"AuditEvent/{shown['id']}") if e["subtype"][0]["code"] == "read"]
    assert read["outcome"] == "0"
    bridge_agent = next(a for a in read["agent"] if not a["requestor"])
    assert bridge_agent["network"]["address"].endswith("/audit")  # the page, not the FHIR API
    nir = case["patient"]["identifier"]["value"]
    assert any(x.get("what", {}).get("identifier", {}).get("value") == nir for x in read["entity"])  # whose data
    listed = httpx.get(page_url(paged), params={"patient": case["token"], "subtype": "ITI-67"},
                       headers={"X-Request-Id": "page-view-1"}, timeout=30)  # fmt: skip
    assert listed.status_code == 200 and listed.headers["x-request-id"] == "page-view-1"
    bad = httpx.get(page_url(paged, "?outcome=7"), headers={"X-Request-Id": "page-view-2"}, timeout=30)
    assert bad.status_code == 400
    recent = events(paged.api, subtype="search-type", _count="20")
    by_request = {x["what"]["identifier"]["value"]: e for e in recent for x in e["entity"]
                  if x.get("type", {}).get("code") == "XrequestId"}  # fmt: skip
    view = by_request["page-view-1"]
    query = base64.b64decode(next(x["query"] for x in view["entity"] if "query" in x)).decode()
    assert query.startswith("GET /audit?patient=") and "subtype=ITI-67" in query
    assert any(x.get("what", {}).get("identifier", {}).get("value") == nir for x in view["entity"])
    assert by_request["page-view-2"]["outcome"] == "4"
    assert "outcome" in by_request["page-view-2"]["outcomeDesc"]


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
