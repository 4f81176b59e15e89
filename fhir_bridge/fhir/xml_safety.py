"""Parsing untrusted XML (``application/fhir+xml`` bodies, CDA documents) without XXE or entity bombs.

Every XML input goes through :func:`parse_xml`, never through a bare ``etree.fromstring``. FHIR XML has no
use for a document type declaration (FHIR xml.html asks parsers to ignore entities and documents to carry none
beyond XML's own), so any ``<!DOCTYPE`` is refused outright, which closes every entity-based attack at once:

* XXE (``<!ENTITY x SYSTEM "file:///etc/passwd">``) and external DTDs (``SYSTEM "http://…"``): the parser
  never resolves entities, never loads a DTD and never touches the network; the document is refused anyway;
* billion laughs (nested internal entities): refused by a scan of the raw bytes before libxml2 sees them,
  so nothing is expanded, not even once;
* huge documents: ``max_bytes`` bounds the input, and ``huge_tree=False`` keeps libxml2's own depth and
  text-node limits.

The byte scan is the fast path; the check of the parsed tree's ``docinfo`` is the one that decides, so a
declaration hidden by an exotic encoding (UTF-16 without a byte-order mark, EBCDIC…) is refused too, after a
parse that could not expand or fetch anything.
"""

from __future__ import annotations

from lxml import etree

from fhir_bridge.errors import MalformedResource, TooLarge

_REFUSED = "DTD/entities are not accepted"
_MARKERS = tuple(
    marker.encode(codec)
    for marker in ("<!DOCTYPE", "<!ENTITY")
    for codec in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
)


def _hardened_parser() -> etree.XMLParser:
    # A parser is not thread-safe: one per call (cheap next to the parse itself).
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
    )


def parse_xml(data: bytes, *, max_bytes: int) -> etree._Element:
    """Parse untrusted XML bytes into an element, refusing any DTD or entity declaration.

    Raises :class:`~fhir_bridge.errors.TooLarge` over ``max_bytes`` and
    :class:`~fhir_bridge.errors.MalformedResource` for a DOCTYPE or anything that is not well-formed XML.
    Error messages give a position, never document content.
    """
    if len(data) > max_bytes:
        raise TooLarge(f"XML body over the limit of {max_bytes} bytes")
    if any(marker in data for marker in _MARKERS):
        raise MalformedResource(_REFUSED)
    try:
        root = etree.fromstring(data, parser=_hardened_parser())
    except etree.XMLSyntaxError as exc:
        line, column = exc.position
        raise MalformedResource(f"the XML is not well-formed (line {line}, column {column})") from None
    docinfo = root.getroottree().docinfo
    # libxml2 records any <!DOCTYPE …> (bare, SYSTEM, PUBLIC or with a subset) as the internal DTD
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise MalformedResource(_REFUSED)
    return root
