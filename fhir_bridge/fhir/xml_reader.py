"""Parsed FHIR XML → FHIR JSON (xml.html, json.html), strictly, like the spec's own parsers.

The reading half of :mod:`fhir_bridge.fhir.xml`, which parses the bytes (hardened, size-limited:
:func:`fhir_bridge.fhir.xml_safety.parse_xml`) before handing the root element here. Strict because the input
is untrusted and because what we accept we keep, hash and sign: unknown elements or attributes, elements out of
order, text where FHIR has none, an empty attribute, an element without value or children (ele-1) and a
malformed boolean/integer/decimal are refused with a :class:`~fhir_bridge.errors.MalformedResource` naming the
path, never the value. A primitive's ``value`` text becomes the JSON string (or :class:`~decimal.Decimal`,
``int``, ``bool``) unchanged; its ``id`` and extensions become the JSON ``_name`` object, a repeating
primitive padding the arrays with ``null``.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from typing import Any

from lxml import etree

from fhir_bridge.errors import MalformedResource
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.xml_metadata import (
    FHIR_NS,
    XHTML_NS,
    ElementInfo,
    JsonType,
    attributes_of,
    elements_of,
    extension_model,
    resource_model,
)

_XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"  # xsi:schemaLocation on a root is tolerated, not kept

# FHIR R4 datatypes.html regular expressions for the primitives that are not strings in JSON
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def element_to_json(root: etree._Element) -> Resource:
    """A parsed FHIR XML resource element as FHIR JSON."""
    return _resource_json(root, "")


def _local(element: etree._Element, path: str) -> str:
    qname = etree.QName(element)
    if qname.namespace != FHIR_NS:
        raise MalformedResource(f"{path or 'root'}: an element outside the FHIR namespace",
                                expression=[path] if path else None)
    return str(qname.localname)


def _resource_json(element: etree._Element, path: str) -> Resource:
    rtype = _local(element, path)
    model = resource_model(rtype)
    if model is None:
        raise MalformedResource(f"{path or 'root'}: unknown resource type {rtype[:64]!r}",
                                expression=[path or "resourceType"])
    out: Resource = {"resourceType": rtype}
    out.update(_read(element, model, f"{path}.{rtype}" if path else rtype, resource=True))
    return out


def _read(element: etree._Element, model: Any, path: str, *, resource: bool = False) -> Resource:
    elements, attributes = elements_of(model), attributes_of(model)
    out: Resource = {}
    _check_attributes(element, attributes, path)
    for name in sorted(attributes):
        if element.get(name) is not None:
            out[name] = element.get(name)
    found: dict[str, list[Any]] = {}
    order = list(elements)
    last = -1
    for child in _children(element, path):
        if etree.QName(child).namespace == XHTML_NS and "div" in elements and elements["div"].kind == "xhtml":
            name = "div"
        else:
            name = _local(child, path)
        known = elements.get(name)
        if known is None or name in attributes:
            raise MalformedResource(f"{path}: unknown element {name[:64]!r}", expression=[f"{path}.{name[:64]}"])
        at = f"{path}.{name}[{len(found.get(name, ()))}]" if known.repeats else f"{path}.{name}"
        position = order.index(name)
        if position < last or (position == last and not known.repeats):
            raise MalformedResource(f"{at}: element out of order or repeated", expression=[at])
        last = position
        found.setdefault(name, []).append(_read_child(child, known, at))
    for name, element_info in elements.items():
        if name not in found:
            continue
        items = found[name]
        if element_info.kind == "primitive":
            values = [value for value, _ in items]
            extras = [extra for _, extra in items]
            if any(v is not None for v in values):
                out[name] = values if element_info.repeats else values[0]
            if any(e is not None for e in extras):
                out[f"_{name}"] = extras if element_info.repeats else extras[0]
        else:
            out[name] = items if element_info.repeats else items[0]
    if not out and not resource:
        raise MalformedResource(f"{path}: an element needs a value or children (ele-1)", expression=[path])
    return out


def _read_child(child: etree._Element, element: ElementInfo, path: str) -> Any:
    if element.kind == "xhtml":
        return etree.tostring(copy.deepcopy(child), encoding="unicode", with_tail=False)
    if element.kind == "resource":
        inner = list(_children(child, path))
        _check_attributes(child, frozenset(), path)
        if len(inner) != 1:
            raise MalformedResource(f"{path}: exactly one resource is expected", expression=[path])
        return _resource_json(inner[0], path)
    if element.kind == "complex":
        return _read(child, element.model, path)
    return _read_primitive(child, element, path)


def _read_primitive(child: etree._Element, element: ElementInfo, path: str) -> tuple[Any, Resource | None]:
    _check_attributes(child, frozenset({"id", "value"}), path)
    extra: Resource = {}
    if child.get("id") is not None:
        extra["id"] = child.get("id")
    extensions = []
    for i, grandchild in enumerate(_children(child, path)):
        if _local(grandchild, path) != "extension":
            raise MalformedResource(f"{path}: a primitive holds extensions only", expression=[path])
        extensions.append(_read(grandchild, extension_model(), f"{path}.extension[{i}]"))
    if extensions:
        extra["extension"] = extensions
    text = child.get("value")
    if text is not None and not text.strip():
        raise MalformedResource(f"{path}: an attribute can not be empty", expression=[path])  # xml.html
    if text is None and not extra:
        raise MalformedResource(f"{path}: an element needs a value or children (ele-1)", expression=[path])
    return (None if text is None else _json_value(text, element.json_type, path)), (extra or None)


def _json_value(text: str, json_type: JsonType, path: str) -> Any:
    if json_type == "boolean":
        if text not in ("true", "false"):
            raise MalformedResource(f"{path}: not a boolean", expression=[path])
        return text == "true"
    if json_type == "integer":
        if not _INTEGER.fullmatch(text):
            raise MalformedResource(f"{path}: not an integer", expression=[path])
        return int(text)
    if json_type == "decimal":
        if not _DECIMAL.fullmatch(text):
            raise MalformedResource(f"{path}: not a decimal", expression=[path])
        return Decimal(text)
    return text


def _children(element: etree._Element, path: str) -> list[etree._Element]:
    """The element children, refusing text where FHIR has none (comments and processing instructions skipped)."""
    if element.text and element.text.strip():
        raise MalformedResource(f"{path or 'root'}: text content is not allowed here", expression=[path])
    children = []
    for child in element:
        if child.tail and child.tail.strip():
            raise MalformedResource(f"{path or 'root'}: text content is not allowed here", expression=[path])
        if isinstance(child.tag, str):
            children.append(child)
    return children


def _check_attributes(element: etree._Element, allowed: frozenset[str], path: str) -> None:
    for name in element.attrib:
        if name in allowed or str(name).startswith("{" + _XSI_NS + "}"):
            continue
        raise MalformedResource(f"{path or 'root'}: unexpected attribute", expression=[path])
