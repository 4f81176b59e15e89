"""The sandbox's synthetic world: determinism, identities, document statuses, faults and big documents."""

from __future__ import annotations

import base64
import hashlib
import tracemalloc
from collections.abc import Iterable

import pytest

from fhir_bridge.fhir.identity import INS_NIR_TEST, nir_key, validate_nir
from fhir_bridge.sandbox.world import (
    World,
    build_world,
    content_bytes,
    iter_content,
    served_size,
    world_summary,
)

ACCENTS = set("éèêëàâçïîôûùüÿœæÉÈÊÀÇÏÎÔ")


def _sha1_b64(chunks: Iterable[bytes]) -> tuple[str, int]:
    sha1, size = hashlib.sha1(), 0
    for chunk in chunks:
        sha1.update(chunk)
        size += len(chunk)
    return base64.b64encode(sha1.digest()).decode(), size


def _fingerprint(world: World) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for p in world.patients:
        rows.append((p.id, p.nir, p.given, p.family, p.birth_date, p.specialty, p.condition))
        rows += [(d.id, d.master_identifier, d.status, d.masked, d.corrupt, d.truncated, d.sha1_b64, d.size,
                  d.replaces, d.date) for d in p.documents]
        rows += [(s.id, s.uid, tuple(x.uid for x in s.series)) for s in p.studies]
    return rows


def test_same_seed_builds_the_same_world_and_another_seed_a_different_one() -> None:
    assert _fingerprint(build_world(7, 6)) == _fingerprint(build_world(7, 6))
    assert _fingerprint(build_world(7, 6)) != _fingerprint(build_world(8, 6))


def test_a_patient_does_not_depend_on_how_many_patients_the_world_has() -> None:
    small = _fingerprint(build_world(3, 2))
    assert small == _fingerprint(build_world(3, 5))[: len(small)]


def test_every_patient_has_a_valid_test_ins() -> None:
    world = build_world(1, 12)
    for p in world.patients:
        assert len(p.nir) == 15
        assert validate_nir(p.nir) == p.nir
        assert int(p.nir[13:]) == nir_key(p.nir[:13])
        assert p.identifier_system == INS_NIR_TEST
        assert world.find_patient(INS_NIR_TEST, p.nir) is p
    assert world.find_patient("urn:oid:1.2.250.1.213.1.4.8", world.patients[0].nir) is None


def test_names_carry_french_accents() -> None:
    world = build_world(1, 8)
    assert all(ACCENTS & set(p.given + p.family) for p in world.patients)


def test_patient_zero_is_an_oncology_case_and_specialties_rotate() -> None:
    for seed in range(1, 8):
        world = build_world(seed, 5)
        assert world.patients[0].specialty == "oncology"
        assert world.patients[0].condition in ("cancer du sein", "cancer du poumon")
        assert [p.specialty for p in world.patients[1:4]] == ["neurology", "cardiology", "rare-disease"]


def test_each_patient_has_8_to_12_varied_current_documents_and_exactly_one_masked() -> None:
    for p in build_world(2, 8).patients:
        current = [d for d in p.documents if d.status == "current"]
        assert 8 <= len(current) <= 12
        assert len({d.type_code for d in current}) >= 4
        assert len({d.content_type for d in p.documents}) >= 2 or len(current) >= 8
        masked = [d for d in p.documents if d.masked]
        assert len(masked) == 1 and masked[0].status == "current"


def test_superseded_documents_are_replaced_by_a_current_version() -> None:
    world = build_world(1, 5)
    for p in world.patients:
        superseded = [d for d in p.documents if d.status == "superseded"]
        assert superseded
        replaced = {d.replaces for d in p.documents if d.replaces}
        assert {d.id for d in superseded} <= replaced
        head = [d for d in p.documents if d.replaces and d.status == "current"]
        assert len(head) == 1 and world.document(head[0].replaces or "") is not None
    assert sum(d.status == "superseded" for d in world.patients[0].documents) == 2  # a chain of three versions
    assert any(d.status == "entered-in-error" for d in world.patients[0].documents)


def test_patient_zero_alone_has_damaged_attachments_by_default() -> None:
    world = build_world(1, 5)
    p0 = world.patients[0].documents
    assert [d.corrupt for d in p0].count(True) == 1
    assert [d.truncated for d in p0].count(True) == 1
    assert all(d.status == "current" and not d.masked for d in p0 if d.has_fault)
    assert not any(d.has_fault for p in world.patients[1:] for d in p.documents)
    more = build_world(1, 5, corrupt_patients=(0, 2, 3))
    assert [any(d.corrupt for d in p.documents) for p in more.patients] == [True, False, True, True, False]


def test_declared_size_and_hash_describe_the_content_and_faults_only_show_when_on() -> None:
    for doc in build_world(1, 5).documents():
        assert _sha1_b64(iter_content(doc, 100)) == (doc.sha1_b64, doc.size)
        served_hash, served = _sha1_b64(iter_content(doc, 100, faults=True))
        assert served == served_size(doc, faults=True)
        if doc.corrupt:
            assert served == doc.size and served_hash != doc.sha1_b64
        elif doc.truncated:
            assert served < doc.size
        else:
            assert (served_hash, served) == (doc.sha1_b64, doc.size)


def test_attachments_never_carry_the_nir_but_may_carry_the_name() -> None:
    world = build_world(1, 8)
    for p in world.patients:
        for doc in p.documents:
            data = content_bytes(doc)
            assert p.nir.encode() not in data
        texts = [content_bytes(d) for d in p.documents if d.content_type == "text/plain"]
        assert all(p.family.encode("utf-8") in t for t in texts)


def test_imaging_patients_have_one_to_three_studies_with_dicom_uids() -> None:
    world = build_world(1, 8)
    for p in world.patients:
        if p.specialty == "rare-disease":
            assert p.studies == []
            continue
        assert 1 <= len(p.studies) <= 3
        for study in p.studies:
            assert study.uid.startswith("2.25.") and len(study.uid) <= 64
            assert set(study.modalities) <= {"CT", "MR", "PT", "US"}
            assert all(s.instances for s in study.series)
            report = [d for d in p.documents if d.study_id == study.id]
            assert len(report) == 1 and report[0].type_code == "18748-4"


def test_world_summary_lists_what_a_consumer_should_find() -> None:
    world = build_world(1, 5)
    on, off = world_summary(world, faults=True), world_summary(world, faults=False)
    p0_on, p0_off = on["patients"][0]["documents"], off["patients"][0]["documents"]
    assert len(p0_on["corrupt"]) == 1 and len(p0_on["truncated"]) == 1
    assert p0_off["corrupt"] == [] and p0_off["truncated"] == []
    assert set(p0_on["intact"]) == set(p0_off["intact"]) - set(p0_on["corrupt"]) - set(p0_on["truncated"])
    assert not set(p0_on["masked"]) & set(p0_on["intact"])


def test_big_documents_have_mixed_sizes_that_sum_to_the_total() -> None:
    total = 6 * 1024 * 1024
    world = build_world(1, 2, big_docs=4, big_total_bytes=total)
    big = [d for d in world.patients[0].documents if d.big is not None]
    assert len(big) == 4 and sum(d.size for d in big) == total
    assert len({d.size for d in big}) == 4
    for doc in big:
        first = next(iter_content(doc, 8))
        *_, last = iter_content(doc, 1 << 20)
        assert first.startswith(b"%PDF-1.4") and last.endswith(b"%%EOF\n")
        assert _sha1_b64(iter_content(doc, 333_333)) == (doc.sha1_b64, doc.size)
        with pytest.raises(ValueError):
            content_bytes(doc)
    ordinary = [d.id for d in world.patients[0].documents if d.big is None]
    assert ordinary == [d.id for d in build_world(1, 2).patients[0].documents]


def test_big_documents_are_never_held_whole_in_memory() -> None:
    total = 48 * 1024 * 1024
    tracemalloc.start()
    try:
        world = build_world(11, 1, big_docs=3, big_total_bytes=total)
        for doc in world.documents():
            for _ in iter_content(doc, 256 * 1024):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes for {total} bytes of documents"


def test_world_refuses_impossible_settings() -> None:
    with pytest.raises(ValueError):
        build_world(1, 0)
    with pytest.raises(ValueError):
        build_world(1, 1, big_docs=3, big_total_bytes=1000)


def test_archive_studies_are_older_extra_studies_that_change_nothing_else() -> None:
    plain, more = build_world(1, 2), build_world(1, 2, archive_studies=5)
    before, after = plain.patients[0], more.patients[0]
    assert [s.id for s in after.studies[: len(before.studies)]] == [s.id for s in before.studies]
    extra = after.studies[len(before.studies):]
    assert len(extra) == 5 and len({s.id for s in extra}) == 5 and len({s.uid for s in extra}) == 5
    oldest = min([d.date for d in before.documents] + [s.started for s in before.studies])
    assert all(s.started < oldest and s.patient_id == before.id for s in extra)
    assert [d.id for d in after.documents] == [d.id for d in before.documents]
    assert more.patients[1] == plain.patients[1]
    assert [s.id for s in build_world(1, 2, archive_studies=5).patients[0].studies] == [s.id for s in after.studies]
    assert more.study(extra[0].id) is extra[0]


def test_no_two_patients_share_an_ins_even_in_a_large_world() -> None:
    world = build_world(patients=3000)
    assert len({p.nir for p in world.patients}) == 3000


def test_a_taken_ins_is_drawn_again() -> None:
    import random
    from datetime import date

    from fhir_bridge.fhir.identity import validate_nir
    from fhir_bridge.sandbox.population import make_nir

    first = make_nir(random.Random(7), "female", date(1960, 5, 1), "75056")
    again = make_nir(random.Random(7), "female", date(1960, 5, 1), "75056", taken={first})
    assert again != first and validate_nir(again) == again
