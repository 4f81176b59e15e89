"""Untrusted XML: no DTD, no entity, no network, no file read; plain FHIR XML still parses."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fhir_bridge.errors import MalformedResource, TooLarge
from fhir_bridge.fhir.xml_safety import parse_xml

LIMIT = 1024 * 1024

PATIENT = b"""<?xml version="1.0" encoding="UTF-8"?>
<Patient xmlns="http://hl7.org/fhir">
  <id value="p1"/>
  <identifier><system value="urn:oid:1.2.250.1.213.1.4.10"/><value value="295109912611193"/></identifier>
  <name><family value="Martin"/><given value="Claire"/></name>
</Patient>"""

XXE_FILE = b"""<?xml version="1.0"?>
<!DOCTYPE Patient [<!ENTITY leak SYSTEM "file:///etc/passwd">]>
<Patient xmlns="http://hl7.org/fhir"><name><family value="&leak;"/></name><text>&leak;</text></Patient>"""


def billion_laughs(levels: int = 10) -> bytes:
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, levels)
    ]
    return (f'<?xml version="1.0"?>\n<!DOCTYPE lolz [{"".join(entities)}]>\n'
            f"<lolz>&lol{levels - 1};</lolz>").encode()


def test_plain_fhir_xml_parses() -> None:
    root = parse_xml(PATIENT, max_bytes=LIMIT)
    assert root.tag == "{http://hl7.org/fhir}Patient"
    family = root.find("{http://hl7.org/fhir}name/{http://hl7.org/fhir}family")
    assert family is not None and family.get("value") == "Martin"


def test_an_xxe_payload_reading_etc_passwd_is_refused_without_reading_it() -> None:
    with pytest.raises(MalformedResource, match="DTD/entities are not accepted") as refused:
        parse_xml(XXE_FILE, max_bytes=LIMIT)
    assert "root:" not in str(refused.value)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_an_xxe_payload_in_another_encoding_is_refused_too(encoding: str) -> None:
    text = XXE_FILE.decode().replace('<?xml version="1.0"?>', f'<?xml version="1.0" encoding="{encoding[:6]}"?>')
    with pytest.raises(MalformedResource, match="DTD/entities are not accepted"):
        parse_xml(text.encode(encoding), max_bytes=LIMIT)


def test_an_external_dtd_over_the_network_is_refused_without_fetching_it(
    listener: tuple[int, list[bytes]],
) -> None:
    port, seen = listener
    for url in ("http://127.0.0.1:9/evil.dtd", f"http://127.0.0.1:{port}/evil.dtd"):
        payload = (f'<?xml version="1.0"?><!DOCTYPE Patient SYSTEM "{url}">'
                   '<Patient xmlns="http://hl7.org/fhir"/>').encode()
        with pytest.raises(MalformedResource, match="DTD/entities are not accepted"):
            parse_xml(payload, max_bytes=LIMIT)
        entity = (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % ext SYSTEM "{url}"> %ext;]><r/>').encode()
        with pytest.raises(MalformedResource, match="DTD/entities are not accepted"):
            parse_xml(entity, max_bytes=LIMIT)
    time.sleep(0.3)
    assert seen == []


def test_a_billion_laughs_payload_is_refused_at_once_without_expansion() -> None:
    payload = billion_laughs()
    started = time.perf_counter()
    with pytest.raises(MalformedResource, match="DTD/entities are not accepted"):
        parse_xml(payload, max_bytes=LIMIT)
    assert time.perf_counter() - started < 0.05


def test_a_bare_doctype_is_refused() -> None:
    with pytest.raises(MalformedResource, match="DTD/entities are not accepted"):
        parse_xml(b'<!DOCTYPE Patient><Patient xmlns="http://hl7.org/fhir"/>', max_bytes=LIMIT)


def test_the_parsed_tree_is_checked_even_when_the_byte_scan_is_evaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from fhir_bridge.fhir import xml_safety
    monkeypatch.setattr(xml_safety, "_MARKERS", ())
    for payload in (XXE_FILE, billion_laughs(4), b'<!DOCTYPE r SYSTEM "http://127.0.0.1:9/x.dtd"><r/>'):
        with pytest.raises(MalformedResource):
            parse_xml(payload, max_bytes=LIMIT)


def test_an_oversized_document_is_refused_before_parsing() -> None:
    with pytest.raises(TooLarge):
        parse_xml(b"<r>" + b"x" * 2048 + b"</r>", max_bytes=1024)


@pytest.mark.parametrize("payload", [b"", b"<Patient", b"not xml", b"<a></b>"])
def test_malformed_xml_is_a_malformed_resource_without_content_in_the_message(payload: bytes) -> None:
    with pytest.raises(MalformedResource, match="not well-formed") as refused:
        parse_xml(payload, max_bytes=LIMIT)
    assert "Patient" not in str(refused.value)


def test_xinclude_is_not_processed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    payload = (f'<r xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="{secret}" parse="text"/></r>'
               ).encode()
    root = parse_xml(payload, max_bytes=LIMIT)
    assert "TOP SECRET" not in "".join(str(t) for t in root.itertext())


def test_a_deeply_nested_document_is_refused_by_libxml2s_depth_limit() -> None:
    depth = 100_000  # huge_tree stays off: libxml2 stops long before this depth, with nothing built
    with pytest.raises(MalformedResource, match="not well-formed"):
        parse_xml(b"<a>" * depth + b"</a>" * depth, max_bytes=LIMIT)
