"""What ``fhir.resources`` says about each FHIR type, as the XML converters need it: the type tables.

Kept apart from the converters (:mod:`fhir_bridge.fhir.xml_writer`, :mod:`fhir_bridge.fhir.xml_reader`) because
both directions read the same facts, and because it is the only place that touches the R4B model classes: only
their class metadata, never a model instance (see :mod:`fhir_bridge.fhir.xml` for why). Per type, once
(cached): the element order (``elements_sequence()``; xml.html: "elements must always appear in the order
documented"), which elements repeat (JSON arrays), which primitives are JSON numbers or booleans, which elements
hold a resource (``contained``, ``Bundle.entry.resource``, ``Parameters.parameter.resource``), which one is the
XHTML ``div``, and which are XML attributes (``Element.id``, ``Extension.url``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any, Literal

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"

Kind = Literal["primitive", "complex", "resource", "xhtml"]
JsonType = Literal["string", "boolean", "integer", "decimal"]


@dataclass(frozen=True)
class ElementInfo:
    """What the metadata says of one element of a type."""

    name: str
    repeats: bool
    kind: Kind
    json_type: JsonType = "string"
    model: Any = None  # the complex type's model class


def _resource_base() -> Any:
    from fhir.resources.R4B.resource import Resource as ResourceModel

    return ResourceModel


@cache
def resource_model(resource_type: str) -> Any:
    """The model class of a resource type, or ``None`` when it is not one."""
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


def _describe(name: str, annotation: Any) -> ElementInfo:
    inner, repeats = _unwrap(annotation)
    resolve = getattr(inner, "get_model_klass", None)  # fhir_core.types.FhirBase: the model by import path
    model = resolve() if callable(resolve) else None
    if isinstance(model, type):
        if model is _resource_base():
            return ElementInfo(name, repeats, "resource")
        return ElementInfo(name, repeats, "complex", model=model)
    base: Any = inner
    marks: tuple[str, ...] = ()
    if typing.get_origin(inner) is typing.Annotated:
        base, *rest = typing.get_args(inner)
        marks = tuple(type(m).__name__ for m in rest)
    if "Xhtml" in marks:
        return ElementInfo(name, repeats, "xhtml")
    if base is bool:
        return ElementInfo(name, repeats, "primitive", "boolean")
    if base is int:
        return ElementInfo(name, repeats, "primitive", "integer")
    if base is Decimal:
        return ElementInfo(name, repeats, "primitive", "decimal")
    return ElementInfo(name, repeats, "primitive")


@cache
def elements_of(model: Any) -> dict[str, ElementInfo]:
    """The type's elements by JSON name, in the order of the definition."""
    fields = {f.alias or key: f for key, f in model.model_fields.items()}
    described: dict[str, ElementInfo] = {}
    for name in model.elements_sequence():
        field = fields.get(name)
        if field is not None:
            described[name] = _describe(name, field.annotation)
    return described


def _is_resource(model: Any) -> bool:
    return issubclass(model, _resource_base())


def _is_extension(model: Any) -> bool:
    return bool(model.__name__ == "Extension")


def attributes_of(model: Any) -> frozenset[str]:
    """Elements written as XML attributes on this type (xml.html: ``Element.id``, ``Extension.url``)."""
    if _is_resource(model):
        return frozenset()
    return frozenset({"id", "url"}) if _is_extension(model) else frozenset({"id"})



@cache
def extension_model() -> Any:
    """The model class of ``Extension`` (a primitive's extensions are read and written with it)."""
    from fhir.resources.R4B.extension import Extension

    return Extension
