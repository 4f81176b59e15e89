"""Build profiles/<id>.json (with snapshots) from profiles/differential/<id>.json.

    .venv/bin/python profiles/build.py

No base R4 package (``hl7.fhir.r4.core``) is reachable from our build, so a snapshot (R4
structuredefinition.html#snapshot: every element of the type with its final cardinality, types and
constraints) is generated here from the fhir.resources R4B model metadata: element order
(``elements_sequence``), min/max, types, reference targets. Our differential is merged onto it. The resources
we profile are identical in R4 and R4B; R4B-only datatypes are left out of choice types. What the model does
not carry (base invariants such as bdl-9, short texts, base bindings) is not in the base part of the snapshot:
where we rely on it, our differential states it. A build-time tool, outside the package: fhir.resources is
imported at run time by fhir_bridge.fhir.resources only. tests/unit/test_profiles.py fails when a committed
snapshot is not what this script makes.
"""

from __future__ import annotations

import copy
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.backboneelement import BackboneElement
from fhir.resources.R4B.element import Element

from fhir_bridge.errors import InvalidInput

Resource = dict[str, Any]
PROFILES_DIR = Path(__file__).resolve().parent
SOURCES_DIR = PROFILES_DIR / "differential"
R4_BASE = "http://hl7.org/fhir/StructureDefinition"
#: R4B datatypes that R4 does not have (left out of choice types: the wire is R4)
_NOT_R4 = frozenset({"CodeableReference", "RatioRange"})
#: differential keys merged into the snapshot element as given (constraint lists are appended to)
_SKIP_KEYS = frozenset({"id", "path"})


def _type_of(annotation: Any) -> tuple[str, Any, bool]:
    """``(FHIR type code, model class or None, repeats)`` of a model field's annotation."""
    repeats = False
    current = annotation
    while True:
        origin = typing.get_origin(current)
        if origin in (typing.Union, types.UnionType):
            current = next(a for a in typing.get_args(current) if a is not type(None))
        elif origin in (list, typing.List):  # noqa: UP006  (the models spell it typing.List)
            repeats, current = True, typing.get_args(current)[0]
        elif origin is typing.Annotated:
            marks = [m for m in current.__metadata__ if type(m).__module__.startswith("fhir_core")]
            name = type(marks[-1]).__name__ if marks else "string"
            return name[0].lower() + name[1:], None, repeats
        else:
            break
    if current is bool:
        return "boolean", None, repeats
    name = getattr(current, "__name__", "")
    if name.endswith("Type") and name != "Type":
        name = name.removesuffix("Type")
    if name == "Resource":
        return "Resource", None, repeats
    cls = get_fhir_model_class(name)
    if issubclass(cls, BackboneElement):
        return "BackboneElement", cls, repeats
    if name not in _DATATYPES and issubclass(cls, Element):  # declared inside a datatype: Timing.repeat
        return "Element", cls, repeats
    return name, cls, repeats


#: complex datatypes whose children a snapshot lists only when a profile constrains inside them
_DATATYPES = frozenset({
    "Address", "Age", "Annotation", "Attachment", "CodeableConcept", "Coding", "ContactDetail", "ContactPoint",
    "Contributor", "Count", "DataRequirement", "Distance", "Dosage", "Duration", "Expression", "Extension",
    "HumanName", "Identifier", "Meta", "Money", "Narrative", "ParameterDefinition", "Period", "Quantity", "Range",
    "Ratio", "Reference", "RelatedArtifact", "SampledData", "Signature", "Timing", "TriggerDefinition",
    "UsageContext", "Element", "BackboneElement", "MoneyQuantity", "SimpleQuantity", "CodeableReference",
    "Population", "ProdCharacteristic", "ProductShelfLife", "MarketingStatus", "ElementDefinition",
})


def _children(cls: Any, path: str, above: Mapping[Any, str] | None = None) -> list[Resource]:
    """The snapshot elements under ``path`` for model ``cls``, backbone elements expanded, in R4 order;
    an element repeating an enclosing one (Composition.section.section) is a ``contentReference`` to it."""
    above = {**(above or {}), cls: path}
    by_alias = {f.alias or name: f for name, f in cls.model_fields.items()}
    out: list[Resource] = []
    done_choices: set[str] = set()
    for name in cls.elements_sequence():
        field = by_alias.get(name)
        if field is None:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        choice = extra.get("one_of_many")
        if isinstance(choice, str):
            if choice in done_choices:
                continue
            done_choices.add(choice)
            options = [f for f in cls.model_fields.values() if isinstance(f.json_schema_extra, dict)
                       and f.json_schema_extra.get("one_of_many") == choice]
            codes = [c for c in (_type_of(f.annotation)[0] for f in options) if c not in _NOT_R4]
            minimum = 1 if extra.get("one_of_many_required") else 0
            out.append(_element(f"{path}.{choice}[x]", minimum, "1", [{"code": c} for c in codes], extra))
            continue
        code, model, repeats = _type_of(field.annotation)
        minimum = 1 if (extra.get("element_required") or field.is_required()) else 0
        typed: Resource = {"code": code}
        targets = extra.get("enum_reference_types")
        if code in ("Reference", "canonical") and isinstance(targets, list):
            typed["targetProfile"] = [f"{R4_BASE}/{t}" for t in targets]
        maximum = "*" if repeats else "1"
        if model is not None and model in above:
            element = _element(f"{path}.{name}", minimum, maximum, [], extra)
            del element["type"]
            out.append({**element, "contentReference": f"#{above[model]}"})
            continue
        out.append(_element(f"{path}.{name}", minimum, maximum, [typed], extra))
        if code in ("BackboneElement", "Element") and model is not None:
            out.extend(_children(model, f"{path}.{name}", above))
    return out


def _element(path: str, minimum: int, maximum: str, typed: list[Resource], extra: Mapping[str, Any]) -> Resource:
    element: Resource = {"id": path, "path": path, "min": minimum, "max": maximum,
                         "base": {"path": path, "min": minimum, "max": maximum}, "type": typed}
    if extra.get("summary_element_property"):
        element["isSummary"] = True
    return element


def base_snapshot(type_name: str) -> list[Resource]:
    """Every element of R4 ``type_name`` (a resource or a datatype such as Extension), root first."""
    cls = get_fhir_model_class(type_name)
    root = {"id": type_name, "path": type_name, "min": 0, "max": "*",
            "base": {"path": type_name, "min": 0, "max": "*"}}
    return [root, *_children(cls, type_name)]


# -- merging our differential ------------------------------------------------------------------------------

def _expand_to(snapshot: list[Resource], path: str) -> int:
    """The index of ``path`` in ``snapshot``, unrolling the datatype of its nearest listed ancestor if needed
    (a profile constraining ``ServiceRequest.subject.identifier`` lists Reference's children)."""
    index = {e["id"]: i for i, e in enumerate(snapshot)}
    if path in index:
        return index[path]
    parent = path.rsplit(".", 1)[0]
    if parent == path:
        raise InvalidInput(f"profile element {path}: not an element of the base type")
    at = _expand_to(snapshot, parent)
    codes = [t["code"] for t in snapshot[at].get("type", [])]
    if len(codes) != 1 or codes[0] not in _DATATYPES:
        raise InvalidInput(f"profile element {path}: {parent} has no single complex type to constrain inside")
    snapshot[at + 1:at + 1] = _children(get_fhir_model_class(codes[0]), parent)
    index = {e["id"]: i for i, e in enumerate(snapshot)}
    if path not in index:
        raise InvalidInput(f"profile element {path}: not an element of {codes[0]}")
    return index[path]


def build_snapshot(profile: Resource) -> Resource:
    """``profile`` (a differential StructureDefinition) with its snapshot: the base R4 elements, ours merged."""
    if profile.get("derivation") != "constraint" or not profile.get("type"):
        raise InvalidInput(f"profile {profile.get('id')}: a constraint on a type is expected")
    if profile.get("baseDefinition") != f"{R4_BASE}/{profile['type']}":
        raise InvalidInput(f"profile {profile.get('id')}: baseDefinition must be the R4 {profile['type']}")
    snapshot = base_snapshot(str(profile["type"]))
    for given in profile.get("differential", {}).get("element", []):
        path = str(given.get("path") or "")
        if given.get("id", path) != path or not path.startswith(f"{profile['type']}"):
            raise InvalidInput(f"profile {profile['id']}: element {path!r} must have id = path (no slicing)")
        target = snapshot[_expand_to(snapshot, path)]
        for key, value in given.items():
            if key in _SKIP_KEYS:
                continue
            if key == "constraint":
                target["constraint"] = [*target.get("constraint", []), *copy.deepcopy(value)]
            else:
                target[key] = copy.deepcopy(value)
        if target["max"] != "*" and int(target["max"]) < int(target["min"]):
            raise InvalidInput(f"profile {profile['id']}: {path} has max below min")
    built = {key: value for key, value in profile.items() if key != "differential"}
    built["snapshot"] = {"element": snapshot}
    built["differential"] = copy.deepcopy(profile.get("differential", {"element": []}))
    return built


def build_directory(sources: Path = SOURCES_DIR, out: Path = PROFILES_DIR) -> list[Path]:
    """Write ``out/<id>.json`` (with snapshot) for every differential in ``sources``; the paths written."""
    written = []
    for path in sorted(sources.glob("*.json")):
        profile = json.loads(path.read_text(encoding="utf-8"))
        if profile.get("id") != path.stem:
            raise InvalidInput(f"profile source {path.name}: its id must be its file name")
        target = out / path.name
        target.write_text(json.dumps(build_snapshot(profile), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(target)
    return written


if __name__ == "__main__":
    for written in build_directory():
        sys.stdout.write(f"{written.name}\n")
