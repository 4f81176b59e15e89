"""FHIR JSON → FHIR XML elements (xml.html), refusing what XML or FHIR can not carry.

The writing half of :mod:`fhir_bridge.fhir.xml`, which serialises the element this module builds. It walks the
JSON dict in the element order of :mod:`fhir_bridge.fhir.xml_metadata` and moves every primitive's text to a
``value`` attribute unchanged (the same digits, ``true``/``false``), because we sign the bytes we emit: a JSON
``_name`` becomes the element's ``id`` attribute and ``extension`` children, ``Element.id`` and ``Extension.url``
become attributes, a narrative ``div`` string is parsed (hardened, :mod:`fhir_bridge.fhir.xml_safety`) into an
XHTML element. Anything else (an unknown element, a value of the wrong shape, a character XML 1.0 can not carry)
is a :class:`~fhir_bridge.errors.MalformedResource` naming the path, never the value.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from lxml import etree

from fhir_bridge.errors import MalformedResource
from fhir_bridge.fhir.xml_metadata import (
    FHIR_NS,
    XHTML_NS,
    ElementInfo,
    attributes_of,
    elements_of,
    extension_model,
    resource_model,
)
from fhir_bridge.fhir.xml_safety import parse_xml

_F = "{" + FHIR_NS + "}"
_DEFAULT_NS: Any = {None: FHIR_NS}  # the stubs type nsmap keys as str; None is lxml's default namespace
# characters XML 1.0 can not carry (§2.2 Char), which JSON strings can; FHIR strings forbid them too (datatypes.html)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def resource_element(obj: Any, path: str, *, root: bool = False) -> etree._Element:
    """A FHIR JSON resource as its XML element (``root``: declaring the FHIR namespace as the default one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        raise MalformedResource(f"{path}: a resource with a resourceType is expected")
    model = resource_model(obj["resourceType"])
    if model is None:
        raise MalformedResource(f"{path}: unknown resourceType", expression=[path])
    element = etree.Element(_F + obj["resourceType"], nsmap=_DEFAULT_NS if root else None)
    _fill(element, {k: v for k, v in obj.items() if k != "resourceType"}, model, obj["resourceType"])
    return element


def _fill(parent: etree._Element, obj: Any, model: Any, path: str) -> None:
    if not isinstance(obj, dict):
        raise MalformedResource(f"{path}: an object is expected", expression=[path])
    elements, attributes = elements_of(model), attributes_of(model)
    for key in obj:
        name = key[1:] if key.startswith("_") else key
        known = elements.get(name)
        if known is None or (key.startswith("_") and (known.kind != "primitive" or name in attributes)):
            raise MalformedResource(f"{path}: unknown element {key[:64]!r}", expression=[f"{path}.{key[:64]}"])
    for name in attributes & obj.keys():
        parent.set(name, _text(obj[name], f"{path}.{name}"))
    for name, element in elements.items():
        if name in attributes or (name not in obj and f"_{name}" not in obj):
            continue
        where = f"{path}.{name}"
        if element.kind == "primitive":
            _write_primitive(parent, element, obj.get(name), obj.get(f"_{name}"), where)
            continue
        for i, item in enumerate(_items(obj[name], element.repeats, where)):
            at = f"{where}[{i}]" if element.repeats else where
            if element.kind == "xhtml":
                parent.append(_xhtml(item, at))
            elif element.kind == "resource":
                etree.SubElement(parent, _F + name).append(resource_element(item, at))
            else:
                _fill(etree.SubElement(parent, _F + name), item, element.model, at)


def _items(value: Any, repeats: bool, path: str) -> list[Any]:
    if value is None:
        return []
    if repeats != isinstance(value, list):
        raise MalformedResource(f"{path}: {'an array' if repeats else 'a single value'} is expected",
                                expression=[path])
    return list(value) if repeats else [value]


def _write_primitive(parent: etree._Element, element: ElementInfo, values: Any, extras: Any, path: str) -> None:
    values, extras = _items(values, element.repeats, path), _items(extras, element.repeats, f"_{path}")
    if element.repeats and values and extras and len(values) != len(extras):
        raise MalformedResource(f"{path}: the value and _ arrays differ in length", expression=[path])
    for i in range(max(len(values), len(extras))):
        value = values[i] if i < len(values) else None
        extra = extras[i] if i < len(extras) else None
        if value is None and extra is None:
            continue
        child = etree.SubElement(parent, _F + element.name)
        at = f"{path}[{i}]" if element.repeats else path
        if extra is not None:
            if not isinstance(extra, dict) or not extra.keys() <= {"id", "extension"}:
                raise MalformedResource(f"{at}: the primitive's _ object takes id and extension only",
                                        expression=[at])
            if "id" in extra:
                child.set("id", _text(extra["id"], f"{at}.id"))
        if value is not None:
            child.set("value", _text(value, at))
        if extra is not None:
            for j, extension in enumerate(_items(extra.get("extension"), True, f"{at}.extension")):
                _fill(etree.SubElement(child, _F + "extension"), extension, extension_model(), f"{at}.extension[{j}]")



def _text(value: Any, path: str) -> str:
    """A JSON primitive as the text of a ``value`` attribute: the same digits, ``true``/``false``."""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        if _NOT_XML.search(value):
            raise MalformedResource(f"{path}: a character XML can not carry", expression=[path])
        return value
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, Decimal) and value.is_finite():
        text = str(value)
        return format(value, "f") if "E" in text or "e" in text else text
    if isinstance(value, float):
        return float.__repr__(value)
    raise MalformedResource(f"{path}: a primitive value is expected", expression=[path])


def _xhtml(value: Any, path: str) -> etree._Element:
    if not isinstance(value, str) or _NOT_XML.search(value):
        raise MalformedResource(f"{path}: the narrative is an XHTML string", expression=[path])
    div = parse_xml(value.encode("utf-8"), max_bytes=len(value.encode("utf-8")) + 1)
    if div.tag != f"{{{XHTML_NS}}}div":
        raise MalformedResource(f"{path}: the narrative must be an XHTML div", expression=[path])
    return div
