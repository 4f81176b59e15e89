"""Case bundles at rest and in the hands of readers: packaged as a signed skeleton, served whole, or
pseudonymised for reviewers abroad. Built by :func:`~fhir_bridge.workflow.bridge.build_bridge`.

* Packaging (the collect job's tail): each document goes to the blob store, the bundle's layout names the
  blobs (:func:`~fhir_bridge.case.signature.layout_of`), and the bundle is signed over the files still on disk;
  the small skeleton is what the stub's ``blob-digest`` extension names.
* Reading: the skeleton is filled with each document's base64 as it streams, ``id`` and ``meta`` in front.
  A reviewer whose network pseudonymises (``config/reviewer-networks.json``) gets the variant of
  :func:`~fhir_bridge.access.pseudonym.pseudonymise_bundle`, signed while it streams, its ``meta.security``
  saying PSEUDED; the same reader sees ServiceRequest, Task and DiagnosticReport through
  :func:`~fhir_bridge.access.pseudonym.pseudonymise_view`, and posts opinions that :meth:`reidentified_opinion`
  puts back under the INS. Nothing pseudonymised is stored: the variant is a transform of the skeleton.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fhir_bridge.access.pseudonym import (
    PSEUDONYM_TERM,
    PSEUDONYMISED_LABEL,
    CasePseudonyms,
    pseudonymise_bundle,
    pseudonymise_view,
    reidentify_opinion,
)
from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.case.packaging import PackagedDocument
from fhir_bridge.case.signature import (
    SKELETON_PREFIX,
    BundleLayout,
    layout_document,
    layout_of,
    parse_skeleton,
    served_chunks,
    sign_from_files,
    skeleton_bytes,
)
from fhir_bridge.errors import BusinessRuleViolation, Forbidden, NotFound
from fhir_bridge.fhir.elements import extension_value, instant
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource, check_resource_type, dumps
from fhir_bridge.fhir.search_index import OUTPUT_TERM
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from fhir_bridge.opinion.report import based_on_request
from fhir_bridge.workflow.collaborators import CaseRules, Ports
from fhir_bridge.workflow.renderings import OpinionRenderings
from fhir_bridge.workflow.taskbook import TaskBook

BLOB_EXTENSION = f"{CANONICAL_BASE}/StructureDefinition/blob-digest"
#: on the stub only: the case's Task (the pseudonym of a bundle is the pseudonym of its case)
CASE_TASK = f"{CANONICAL_BASE}/StructureDefinition/case-task"
#: on the stored case Bundle stub only (never served): whose case it is, for the audit of a Bundle read
BUNDLE_PATIENT = f"{CANONICAL_BASE}/StructureDefinition/case-patient"


def bundle_patient(stub: Resource) -> PatientIdentifier | None:
    """The patient of a stored case Bundle stub (None for stubs stored before the audit recorded it)."""
    return PatientIdentifier.from_element(extension_value(stub, BUNDLE_PATIENT, "valueIdentifier"))


class CaseBundles:
    """Packaging and reading case bundles; ``signer`` None leaves bundles unsigned (tests of the workflow
    without keys), ``pseudonym_key`` None refuses pseudonymised readers (fail closed); ``renderings`` makes a
    pseudonymised report's presentedForm again (its PDF and HTML name the patient by INS)."""

    def __init__(self, ports: Ports, rules: CaseRules, *, book: TaskBook, renderings: OpinionRenderings,
                 pseudonym_key: bytes | None) -> None:
        self.ports, self.rules, self.book, self.renderings = ports, rules, book, renderings
        self.pseudonyms = CasePseudonyms(pseudonym_key) if pseudonym_key is not None else None
        rules.networks.check(rules.registry)

    async def package(self, bundle: Resource, documents: list[PackagedDocument]) -> BundleLayout:
        """Put each document in the blob store and sign the bundle over the files still on disk (a worker
        thread hashes them: memory stays bounded whatever the case's size)."""
        digests = {}
        for document in documents:
            digests[document.path] = (await self.ports.blobs.put_file(document.path)).digest
        layout = layout_of(bundle, digests)
        if self.ports.signer is None:
            return layout
        files = {digest: path for path, digest in digests.items()}
        signed_at = instant(self.ports.clock(), timespec="seconds")
        return await asyncio.to_thread(sign_from_files, layout, files, self.ports.signer, signed_at)

    async def store_stub(self, bundle: Resource, layout: BundleLayout, *, patient: PatientIdentifier,
                         task_id: str, generation: int) -> Resource:
        """Store the case Bundle as served by id: its skeleton in the blob store, a small stub in the store
        naming it, the patient and the Task; one per generation (a reclaimed job finds the first one's)."""
        skeleton = await self.ports.blobs.put_bytes(skeleton_bytes(layout))
        stub: Resource = {
            "resourceType": "Bundle",
            "identifier": bundle["identifier"],
            "type": "document",
            "timestamp": bundle["timestamp"],
            "extension": [
                {"url": BLOB_EXTENSION, "valueString": skeleton.digest},
                {"url": BUNDLE_PATIENT, "valueIdentifier": patient.element},
                {"url": CASE_TASK, "valueReference": {"reference": f"Task/{task_id}"}},
            ],
        }
        # the case pseudonym is indexed so that case_for_pseudonym finds the case
        index = {PSEUDONYM_TERM: [self.pseudonyms.of(task_id)]} if self.pseudonyms else {}
        key = f"case-bundle:Task/{task_id}:{generation}"
        stored, _ = await self.ports.store.create(stub, index=index, unique_key=key)
        return stored

    async def chunks(self, bundle_id: str, reader: AccessContext | None = None) -> AsyncIterator[bytes]:
        """The served bundle; see the module docstring."""
        stub = await self.ports.store.read("Bundle", bundle_id)
        digest = next(e["valueString"] for e in stub.get("extension", []) if e.get("url") == BLOB_EXTENSION)
        head: Resource = {"id": stub["id"], "meta": stub["meta"]}
        pseudonymise = self.needs_pseudonym(reader)
        stored = self.ports.blobs.open_chunks(digest)
        first = await anext(stored, b"")
        if not first.startswith(SKELETON_PREFIX):  # packaged before skeletons: the whole bundle, unsigned
            if pseudonymise:
                await _aclose(stored)
                raise Forbidden("this case was packaged before pseudonymisation existed: refresh it first")
            yield dumps(head)[:-1] + b"," + first[1:]
            async for chunk in stored:
                yield chunk
            return
        layout = parse_skeleton(first + b"".join([chunk async for chunk in stored]))
        if not pseudonymise:
            async for chunk in served_chunks(layout, head, self.ports.blobs.open_chunks):
                yield chunk
            return
        pseudonym = self.case_pseudonym(await self._task_id(stub))
        variant = layout_of(pseudonymise_bundle(layout_document(layout), pseudonym))
        head["meta"] = {**head["meta"], "security": [*head["meta"].get("security", []), PSEUDONYMISED_LABEL]}
        async for chunk in served_chunks(variant, head, self.ports.blobs.open_chunks, signer=self.ports.signer,
                                         when=instant(self.ports.clock(), timespec="seconds")):
            yield chunk

    def needs_pseudonym(self, reader: AccessContext | None) -> bool:
        """A reviewer whose network pseudonymises; a reviewer client naming no known PractitionerRole too."""
        if reader is None or reader.role != "reviewer":
            return False
        reviewer = self.rules.registry.reviewers.get(reader.reviewer or "")
        return reviewer is None or self.rules.networks.pseudonymises(reviewer.network)

    def case_pseudonym(self, task_id: str) -> str:
        if self.pseudonyms is None:
            raise Forbidden("this reader's cases are pseudonymised and the bridge has no pseudonym key")
        return self.pseudonyms.of(task_id)

    async def case_for_pseudonym(self, pseudonym: str) -> Resource:
        page = await self.ports.store.search("Bundle", {PSEUDONYM_TERM: [pseudonym]}, count=1)
        for stub in page.resources:
            task_id = await self._task_id(stub)
            if self.pseudonyms is not None and self.pseudonyms.belongs_to(pseudonym, task_id):
                return await self.ports.store.read("Task", task_id)
        raise NotFound("no case has that pseudonym")

    async def reader_view(self, resource: Resource, reader: AccessContext | None) -> Resource:
        if not self.needs_pseudonym(reader):
            return resource
        rtype = resource.get("resourceType")
        if rtype == "Task":
            task_id = str(resource["id"])
        elif rtype == "ServiceRequest":
            task_id = await self._task_for(str(resource["id"]))
        elif rtype == "DiagnosticReport":
            task_id = await self._task_for(based_on_request(resource))
        else:
            raise Forbidden(f"{rtype} has no pseudonymised view")
        pseudonym = self.case_pseudonym(task_id)
        view = pseudonymise_view(resource, pseudonym)
        if rtype == "DiagnosticReport" and view.get("presentedForm"):
            # the renderings are bytes the scrubber can not read: made again from the pseudonymised report and
            # request, never passed on as they are (they carry the INS)
            view = {k: v for k, v in view.items() if k != "presentedForm"}
            request = await self.ports.store.read("ServiceRequest", based_on_request(resource))
            task = await self.ports.store.read("Task", task_id)
            view = await self.renderings.rerendered(view, pseudonymise_view(request, pseudonym), task)
        return view

    async def reidentified_opinion(self, body: Any, reader: AccessContext | None) -> Any:
        if not self.needs_pseudonym(reader):
            return body
        report = check_resource_type(body, "DiagnosticReport")
        request_id = based_on_request(report)
        try:
            request = await self.ports.store.read("ServiceRequest", request_id)
        except NotFound:
            raise BusinessRuleViolation("basedOn names an unknown ServiceRequest", expression=["basedOn"]) from None
        pseudonym = self.case_pseudonym(await self._task_for(request_id))
        return reidentify_opinion(report, pseudonym, request["subject"]["identifier"])

    async def _task_for(self, request_id: str) -> str:
        return str((await self.book.for_request(request_id))["id"])

    async def _task_id(self, stub: Resource) -> str:
        reference = (extension_value(stub, CASE_TASK, "valueReference") or {}).get("reference")
        if isinstance(reference, str) and reference.startswith("Task/"):
            return reference.split("/", 1)[1]
        page = await self.ports.store.search("Task", {OUTPUT_TERM: [f"Bundle/{stub['id']}"]}, count=1)
        if not page.resources:
            raise NotFound("no case for that Bundle")
        return str(page.resources[0]["id"])


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()
