"""FHIR R4 XML <-> FHIR JSON, exact both ways (FHIR R4 xml.html and json.html).

Why not ``fhir.resources``' own ``model_dump_xml`` / ``model_validate_xml``: they go through the pydantic
models, which are lossy (``1.50`` comes back ``1.5``, ``…T10:00:00.000+02:00`` loses its milliseconds, while
datatypes.html "decimal" says precision is significant and we sign bytes, STANDARDS.md §6), their XML reader
drops the ``id`` of a primitive (``<birthDate id="…">``), and they parse the narrative ``div`` with a bare
``etree.fromstring`` (no hardening). So the bridge converts between XML and the plain JSON dicts it works on,
and reads from ``fhir.resources`` only its *metadata*: the element order of each type
(``elements_sequence()``; xml.html: "elements must always appear in the order documented"), which elements
repeat (JSON arrays), which primitives are JSON numbers or booleans (json.html: integer, decimal and boolean
values are JSON numbers and booleans), where a resource sits inside a container element (``contained``,
``Bundle.entry.resource``, ``Parameters.parameter.resource``) and which element is the XHTML ``div``. No model
is ever built (only class metadata is read), so no value is re-formatted: a primitive's text moves between the
``value`` attribute and the JSON string (or Decimal, int, bool) unchanged.

The mapping (xml.html, json.html "JSON representation of primitive elements"):

* a primitive is ``<name value="…"/>``; its ``id`` and extensions (JSON ``_name``) are the element's ``id``
  attribute and ``extension`` children; a repeating primitive pads the JSON arrays with ``null``;
* ``Element.id`` and ``Extension.url`` are attributes, ``Resource.id`` is an element;
* ``Narrative.div`` is XHTML in its own namespace, a string in JSON.

This module is the boundary, bytes on one side and JSON dicts on the other; the work is split by concept:
:mod:`~fhir_bridge.fhir.xml_metadata` (the type tables both directions read), :mod:`~fhir_bridge.fhir.xml_writer`
(JSON → XML) and :mod:`~fhir_bridge.fhir.xml_reader` (XML → JSON). Reading is strict, like the spec's own
parsers: XML input always goes through :func:`fhir_bridge.fhir.xml_safety.parse_xml` (no DTD, no entity, no
network, size limit) and anything FHIR does not allow is refused with a
:class:`~fhir_bridge.errors.MalformedResource` naming the path, never the value (see the reader).
``fhir.resources`` ships R4B models; every element of the resources we serve is the same in R4 (see
:mod:`fhir_bridge.fhir.resources`).
"""

from __future__ import annotations

from lxml import etree

from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.xml_metadata import FHIR_NS, XHTML_NS
from fhir_bridge.fhir.xml_reader import element_to_json
from fhir_bridge.fhir.xml_safety import parse_xml
from fhir_bridge.fhir.xml_writer import resource_element

__all__ = ["FHIR_NS", "XHTML_NS", "element_to_json", "from_xml", "to_xml"]


def to_xml(resource: Resource) -> bytes:
    """A FHIR JSON resource (as :func:`fhir_bridge.fhir.resources.loads` gives it) as FHIR XML bytes, UTF-8."""
    root = resource_element(resource, str(resource.get("resourceType", "Resource")), root=True)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + bytes(etree.tostring(root, encoding="UTF-8",
                                                                              xml_declaration=False))


def from_xml(data: bytes, *, max_bytes: int) -> Resource:
    """Untrusted FHIR XML bytes → the FHIR JSON dict a JSON body would give (decimals as :class:`Decimal`).

    Parsed by :func:`fhir_bridge.fhir.xml_safety.parse_xml` (refuses DTDs/entities, :class:`TooLarge` over
    ``max_bytes``), then converted strictly (see :mod:`fhir_bridge.fhir.xml_reader`).
    """
    return element_to_json(parse_xml(data, max_bytes=max_bytes))
