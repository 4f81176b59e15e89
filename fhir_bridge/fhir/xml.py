"""FHIR R4 XML <-> FHIR JSON, exact both ways (FHIR R4 xml.html and json.html).

Why not ``fhir.resources``' own ``model_dump_xml`` / ``model_validate_xml``: they go through the pydantic
models, which are lossy (``1.50`` comes back ``1.5``, ``…T10:00:00.000+02:00`` loses its milliseconds, while
datatypes.html "decimal" says precision is significant and we sign bytes, STANDARDS.md §6), their XML reader
drops the ``id`` of a primitive (``<birthDate id="…">``), and they parse the narrative ``div`` with a bare
``etree.fromstring`` (no hardening). So this module converts between XML and the plain JSON dicts the bridge
works on, and reads from ``fhir.resources`` only its *metadata*: the element order of each type
(``elements_sequence()``; xml.html: "elements must always appear in the order documented"), which elements
repeat (JSON arrays), which primitives are JSON numbers or booleans (json.html: integer, decimal and boolean
values are JSON numbers and booleans), where a resource sits inside a container element (``contained``,
``Bundle.entry.resource``, ``Parameters.parameter.resource``) and which element is the XHTML ``div``. No model
is ever built (this module only reads class metadata), so no value is re-formatted: a primitive's text moves
between the ``value`` attribute and the JSON string (or Decimal, int, bool) unchanged.

The mapping (xml.html, json.html "JSON representation of primitive elements"):

* a primitive is ``<name value="…"/>``; its ``id`` and extensions (JSON ``_name``) are the element's ``id``
  attribute and ``extension`` children; a repeating primitive pads the JSON arrays with ``null``;
* ``Element.id`` and ``Extension.url`` are attributes, ``Resource.id`` is an element;
* ``Narrative.div`` is XHTML in its own namespace, a string in JSON.

Reading is strict, like the spec's own parsers: XML input always goes through
:func:`fhir_bridge.fhir.xml_safety.parse_xml` (no DTD, no entity, no network, size limit); unknown elements or
attributes, elements out of order, text where FHIR has none, an empty attribute, an element without value or
children (ele-1) and a malformed boolean/integer/decimal are refused with a
:class:`~fhir_bridge.errors.MalformedResource` naming the path, never the value. ``fhir.resources`` ships R4B
models; every element of the resources we serve is the same in R4 (see :mod:`fhir_bridge.fhir.resources`).
"""

from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any, Literal

from lxml import etree

from fhir_bridge.errors import MalformedResource
from fhir_bridge.fhir.xml_safety import parse_xml

Resource = dict[str, Any]
FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
_XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"  # xsi:schemaLocation on a root is tolerated, not kept
_F = "{" + FHIR_NS + "}"
_DEFAULT_NS: Any = {None: FHIR_NS}  # the stubs type nsmap keys as str; None is lxml's default namespace

# FHIR R4 datatypes.html regular expressions for the primitives that are not strings in JSON
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
# characters XML 1.0 can not carry (§2.2 Char), which JSON strings can; FHIR strings forbid them too (datatypes.html)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

Kind = Literal["primitive", "complex", "resource", "xhtml"]
JsonType = Literal["string", "boolean", "integer", "decimal"]


@dataclass(frozen=True)
class _Element:
    """What the metadata says of one element of a type."""

    name: str
    repeats: bool
    kind: Kind
    json_type: JsonType = "string"
    model: Any = None  # the complex type's model class


# ---------------------------------------------------------------------------------------------------------------
# model metadata (fhir.resources R4B), read once per type


def _resource_base() -> Any:
    from fhir.resources.R4B.resource import Resource as ResourceModel

    return ResourceModel


@cache
def _resource_model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return None
    return model if isinstance(model, type) and issubclass(model, _resource_base()) else None


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``Optional[List[Optional[X]]]`` → ``(X, True)``; ``X | None`` → ``(X, False)``."""

    def required(hint: Any) -> Any:
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return next(a for a in typing.get_args(hint) if a is not type(None))
        return hint

    annotation = required(annotation)
    if typing.get_origin(annotation) is list:
        return required(typing.get_args(annotation)[0]), True
    return annotation, False


def _describe(name: str, annotation: Any) -> _Element:
    inner, repeats = _unwrap(annotation)
    resolve = getattr(inner, "get_model_klass", None)  # fhir_core.types.FhirBase: the model by import path
    model = resolve() if callable(resolve) else None
    if isinstance(model, type):
        if model is _resource_base():
            return _Element(name, repeats, "resource")
        return _Element(name, repeats, "complex", model=model)
    base: Any = inner
    marks: tuple[str, ...] = ()
    if typing.get_origin(inner) is typing.Annotated:
        base, *rest = typing.get_args(inner)
        marks = tuple(type(m).__name__ for m in rest)
    if "Xhtml" in marks:
        return _Element(name, repeats, "xhtml")
    if base is bool:
        return _Element(name, repeats, "primitive", "boolean")
    if base is int:
        return _Element(name, repeats, "primitive", "integer")
    if base is Decimal:
        return _Element(name, repeats, "primitive", "decimal")
    return _Element(name, repeats, "primitive")


@cache
def _elements(model: Any) -> dict[str, _Element]:
    """The type's elements by JSON name, in the order of the definition."""
    fields = {f.alias or key: f for key, f in model.model_fields.items()}
    described: dict[str, _Element] = {}
    for name in model.elements_sequence():
        field = fields.get(name)
        if field is not None:
            described[name] = _describe(name, field.annotation)
    return described


def _is_resource(model: Any) -> bool:
    return issubclass(model, _resource_base())


def _is_extension(model: Any) -> bool:
    return bool(model.__name__ == "Extension")


def _attributes(model: Any) -> frozenset[str]:
    """Elements written as XML attributes on this type (xml.html: ``Element.id``, ``Extension.url``)."""
    if _is_resource(model):
        return frozenset()
    return frozenset({"id", "url"}) if _is_extension(model) else frozenset({"id"})


# ---------------------------------------------------------------------------------------------------------------
# JSON → XML


def to_xml(resource: Resource) -> bytes:
    """A FHIR JSON resource (as :func:`fhir_bridge.fhir.resources.loads` gives it) as FHIR XML bytes, UTF-8."""
    root = _resource_element(resource, str(resource.get("resourceType", "Resource")), root=True)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + bytes(etree.tostring(root, encoding="UTF-8",
                                                                              xml_declaration=False))


def _resource_element(obj: Any, path: str, *, root: bool = False) -> etree._Element:
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        raise MalformedResource(f"{path}: a resource with a resourceType is expected")
    model = _resource_model(obj["resourceType"])
    if model is None:
        raise MalformedResource(f"{path}: unknown resourceType", expression=[path])
    element = etree.Element(_F + obj["resourceType"], nsmap=_DEFAULT_NS if root else None)
    _fill(element, {k: v for k, v in obj.items() if k != "resourceType"}, model, obj["resourceType"])
    return element


def _fill(parent: etree._Element, obj: Any, model: Any, path: str) -> None:
    if not isinstance(obj, dict):
        raise MalformedResource(f"{path}: an object is expected", expression=[path])
    elements, attributes = _elements(model), _attributes(model)
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
                etree.SubElement(parent, _F + name).append(_resource_element(item, at))
            else:
                _fill(etree.SubElement(parent, _F + name), item, element.model, at)


def _items(value: Any, repeats: bool, path: str) -> list[Any]:
    if value is None:
        return []
    if repeats != isinstance(value, list):
        raise MalformedResource(f"{path}: {'an array' if repeats else 'a single value'} is expected",
                                expression=[path])
    return list(value) if repeats else [value]


def _write_primitive(parent: etree._Element, element: _Element, values: Any, extras: Any, path: str) -> None:
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
                _fill(etree.SubElement(child, _F + "extension"), extension, _extension_model(), f"{at}.extension[{j}]")


@cache
def _extension_model() -> Any:
    from fhir.resources.R4B.extension import Extension

    return Extension


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


# ---------------------------------------------------------------------------------------------------------------
# XML → JSON


def from_xml(data: bytes, *, max_bytes: int) -> Resource:
    """Untrusted FHIR XML bytes → the FHIR JSON dict a JSON body would give (decimals as :class:`Decimal`).

    Parsed by :func:`fhir_bridge.fhir.xml_safety.parse_xml` (refuses DTDs/entities, :class:`TooLarge` over
    ``max_bytes``), then converted strictly (see the module docstring).
    """
    return element_to_json(parse_xml(data, max_bytes=max_bytes))


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
    model = _resource_model(rtype)
    if model is None:
        raise MalformedResource(f"{path or 'root'}: unknown resource type {rtype[:64]!r}",
                                expression=[path or "resourceType"])
    out: Resource = {"resourceType": rtype}
    out.update(_read(element, model, f"{path}.{rtype}" if path else rtype, resource=True))
    return out


def _read(element: etree._Element, model: Any, path: str, *, resource: bool = False) -> Resource:
    elements, attributes = _elements(model), _attributes(model)
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


def _read_child(child: etree._Element, element: _Element, path: str) -> Any:
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


def _read_primitive(child: etree._Element, element: _Element, path: str) -> tuple[Any, Resource | None]:
    _check_attributes(child, frozenset({"id", "value"}), path)
    extra: Resource = {}
    if child.get("id") is not None:
        extra["id"] = child.get("id")
    extensions = []
    for i, grandchild in enumerate(_children(child, path)):
        if _local(grandchild, path) != "extension":
            raise MalformedResource(f"{path}: a primitive holds extensions only", expression=[path])
        extensions.append(_read(grandchild, _extension_model(), f"{path}.extension[{i}]"))
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
