"""Reference data: the one place that opens the bridge's data files (``config/``, ``mappings/``, ``profiles/``).

The core only parses and checks data it is given (``registry_from``, ``deadline_policy_from``…); this adapter
finds each file, reads it as JSON and hands the core the result, so that where the files live is a deployment's
choice (settings) and a core module never depends on where it was installed. Each file is taken from its setting
when one is set, else from the copy shipped inside the package (``fhir_bridge/data``, found with
:mod:`importlib.resources`, so ``pip install fhir-bridge`` gives a bridge that starts from any directory). In a
checkout ``fhir_bridge/data/{config,mappings,profiles}`` are symlinks to the top-level folders people edit: one
copy of each file.

:class:`ReferenceFiles` says where each file is for a process (its settings); the loaders (an optional path
each, the shipped copy by default) read one each, and :func:`fhir_bridge.main.load_reference_data` all of them,
once, at start-up. Errors are the
ones the loaders always gave (``InvalidInput`` naming the file), so a broken edit still fails at start-up.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fhir_bridge.access.pseudonym import ReviewerNetworks, networks_from
from fhir_bridge.access.scopes import role_ceilings_from
from fhir_bridge.case.deadlines import DeadlinePolicy, deadline_policy_from
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.profiles import Profiles, profiles_from
from fhir_bridge.fhir.terminology import CANONICAL_BASE, Terminology, terminology_from
from fhir_bridge.opinion.writeback import WriteBackConfig, write_back_config_from
from fhir_bridge.rendering.layout import report_labels_from
from fhir_bridge.rendering.view import ReportLabels
from fhir_bridge.review.reviewers import ReviewerRegistry, registry_from
from fhir_bridge.review.triage_rules import TriageRules, triage_rules_from

if TYPE_CHECKING:
    from fhir_bridge.adapters.settings import Settings

#: a data file or folder: a path from the settings, or the packaged copy (a Traversable: importlib.resources)
Source = Path | Traversable
__all__ = [
    "ReferenceFiles", "Source", "load_deadline_policy", "load_labels", "load_networks",
    "load_profiles", "load_registry", "load_role_ceilings", "load_terminology",
    "load_triage_rules", "load_write_back_config", "shipped",
]


def shipped(*parts: str) -> Traversable:
    """The copy shipped in the package: ``fhir_bridge/data/<parts>`` (config, mappings or profiles)."""
    return files("fhir_bridge").joinpath("data", *parts)


@dataclass(frozen=True)
class ReferenceFiles:
    """Where each data file is for a process: its setting when set, else the shipped copy."""

    mappings: Source
    profiles: Source
    reviewers: Source
    deadlines: Source
    reviewer_networks: Source
    write_back: Source
    roles: Source
    report_labels: Source

    @classmethod
    def of(cls, settings: Settings | None = None) -> ReferenceFiles:
        """``config_dir`` / ``mappings_dir`` / ``profiles_dir`` and the ``[reference]`` paths of ``settings``
        (None: every shipped copy). A file setting wins over ``config_dir``."""
        def folder(value: str, name: str) -> Source:
            return Path(value) if value else shipped(name)

        if settings is None:
            return cls._in(shipped("config"), shipped("mappings"), shipped("profiles"), {})
        reference = settings.reference
        given = {name: Path(value) for name, value in reference.model_dump().items() if value}
        return cls._in(folder(settings.config_dir, "config"), folder(settings.mappings_dir, "mappings"),
                       folder(settings.profiles_dir, "profiles"), given)

    @classmethod
    def _in(cls, config: Source, mappings: Source, profiles: Source, given: Mapping[str, Source]) -> ReferenceFiles:
        names = {"reviewers": "reviewers.json", "deadlines": "deadlines.json",
                 "reviewer_networks": "reviewer-networks.json", "write_back": "write-back.json",
                 "roles": "roles.json", "report_labels": "report-labels.json"}
        return cls(mappings=mappings, profiles=profiles,
                   **{key: given.get(key) or config / name for key, name in names.items()})


# -- reading ------------------------------------------------------------------------------------------------


def _json(source: Source, refuse: Callable[[Exception], Exception] | None = None) -> Any:
    """``source`` parsed; an unreadable or malformed file becomes ``refuse(exc)`` (each file's own wording)."""
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if refuse is None:
            raise
        raise refuse(exc) from None


def _json_files(directory: Source, refuse: Callable[[str, Exception], Exception]) -> list[tuple[str, Any]]:
    """(file name, parsed JSON) of every ``*.json`` file directly in ``directory``, by name."""
    found = sorted((entry for entry in directory.iterdir() if entry.name.endswith(".json") and entry.is_file()),
                   key=lambda entry: entry.name)
    return [(entry.name, _json(entry, functools.partial(refuse, entry.name))) for entry in found]


def load_terminology(directory: Source | None = None) -> Terminology:
    """Every ``mappings/*.json`` (default: the shipped copy), indexed by :func:`terminology_from`."""
    return terminology_from(_json_files(
        directory or shipped("mappings"),
        lambda name, exc: InvalidInput(f"mappings file {name} is not readable JSON: {exc}")))


def load_triage_rules(path_or_dir: Source | None = None, extra: Sequence[Source] = ()) -> TriageRules:
    """``triage-rules.json`` of a mappings folder (or the file given; default: the shipped mappings), then
    each ``extra`` rule file, combined by :func:`triage_rules_from`."""
    given = path_or_dir or shipped("mappings")
    main = given / "triage-rules.json" if given.is_dir() else given
    return triage_rules_from(_named(path, "triage rules") for path in (main, *extra))


def _named(source: Source, what: str) -> tuple[str, Any]:
    """(file name, parsed JSON) of ``source``; unreadable: "<what> <name> is not readable JSON"."""
    return source.name, _json(source, lambda exc: InvalidInput(f"{what} {source.name} is not readable JSON: {exc}"))


def load_registry(path: Source | None = None) -> ReviewerRegistry:
    """``config/reviewers.json`` (default: the shipped copy), checked by :func:`registry_from`."""
    name, bundle = _named(path or shipped("config", "reviewers.json"), "reviewer registry")
    return registry_from(bundle, name)


def load_deadline_policy(path: Source | None = None) -> DeadlinePolicy:
    """``config/deadlines.json`` (default: the shipped copy), checked by :func:`deadline_policy_from`."""
    name, raw = _named(path or shipped("config", "deadlines.json"), "deadline file")
    return deadline_policy_from(raw, name)


def load_networks(path: Source | None = None) -> ReviewerNetworks:
    """``config/reviewer-networks.json`` (default: the shipped copy), checked by :func:`networks_from`."""
    source = path or shipped("config", "reviewer-networks.json")
    document = _json(source, lambda exc: InvalidInput(f"{source.name}: cannot read the reviewer networks"))
    return networks_from(document, source.name)


def load_write_back_config(path: Source | None = None) -> WriteBackConfig:
    """``config/write-back.json`` (default: the shipped copy), checked by :func:`write_back_config_from`."""
    source = path or shipped("config", "write-back.json")
    data = _json(source, lambda exc: InvalidInput(
        f"{source.name} is not a valid write-back configuration ({type(exc).__name__})"))
    return write_back_config_from(data, source.name)


def load_role_ceilings(path: Source | None = None) -> dict[str, tuple[str, ...]]:
    """``config/roles.json`` (default: the shipped copy), checked by :func:`role_ceilings_from`; errors name
    the whole path, as they always did (roles are a security setting: say exactly which file)."""
    source = path or shipped("config", "roles.json")
    document = _json(source, lambda exc: InvalidInput(f"cannot read the role ceilings from {source}"))
    return role_ceilings_from(document, str(source))


def load_labels(path: Source | None = None) -> ReportLabels:
    """``config/report-labels.json`` (default: the shipped copy), checked by :func:`report_labels_from`."""
    source = path or shipped("config", "report-labels.json")
    return report_labels_from(_json(source), source.name)


def load_profiles(directory: Source | None = None, base: str = CANONICAL_BASE) -> Profiles:
    """Every ``profiles/*.json`` (default: the shipped copy), rebased to ``base`` by :func:`profiles_from`."""
    return profiles_from(_json_files(
        directory or shipped("profiles"),
        lambda name, exc: InvalidInput(f"profile {name} is not readable JSON: {exc}")), base)
