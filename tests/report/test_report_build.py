"""SR and KOS built from a verdict on a real scanner series: content, references, validity."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from copy import deepcopy
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    EnhancedMRImageStorage,
    KeyObjectSelectionDocumentStorage,
)

from node.errors import ReportError
from node.report import build as build_module
from node.report.build import (
    PRIVATE_SCHEME,
    ReportIdentity,
    build_kos,
    build_rejection_note,
    build_sr,
    report_series_uid,
)
from node.report.content import SeriesVerdict, SliceVerdict
from node.report.header import HEADER_TYPE2_KEYWORDS
from tests.helpers.reports import (
    dciodvfy,
    image_library,
    kos_references,
    make_verdict,
    measurement_groups,
)

IDENTITY = ReportIdentity(ae_title="VAENODE", software_version="0.1.0")
FLAGGED = {10, 11, 12, 13}


def roundtrip(ds: Dataset) -> Dataset:
    """Encode to bytes and read back with pydicom's strict validation on."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pydicom.config.strict_reading():
        return pydicom.dcmread(BytesIO(buf.getvalue()))


def test_sr_has_one_group_per_image_referencing_it(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, FLAGGED)
    sr = roundtrip(build_sr(verdict, sources, identity=IDENTITY))

    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID == report_series_uid(sources[0].SeriesInstanceUID, "SR")
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sr.PatientID == sources[0].PatientID
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report

    groups = measurement_groups(sr)
    image_groups, summary = groups[:-1], groups[-1]
    assert len(image_groups) == len(sources)
    for s, group in zip(verdict.slices, image_groups, strict=True):
        assert group.references == ((s.sop_class_uid, s.sop_instance_uid, ()),)
        assert group.finding == "111101"  # Image Quality
        assert group.measurements["Log marginal likelihood"] == pytest.approx(s.log_likelihood)
        assert group.measurements["Certainty of Finding"] == pytest.approx(100 * s.confidence)
        assert group.measurements["KL divergence to prior"] == pytest.approx(s.kl)
        assert group.measurements["Evidence lower bound"] == pytest.approx(s.elbo)
        assert group.units["Certainty of Finding"] == "%"
        # CID 7036: RID14 non-diagnostic for flagged images, RID12 diagnostic otherwise.
        assert group.evaluations["Image Quality"] == ("RID14" if s.abnormal else "RID12")
        assert group.algorithm["Algorithm Name"] == ["brain-t1-vae"]
        assert group.algorithm["Algorithm Version"] == ["1.2.3"]
        assert "threshold_log_likelihood=-1234.5" in group.algorithm["Algorithm Parameters"]

    assert summary.finding == "130550"  # Imaging Series Quality
    assert summary.references == ()
    assert summary.measurements["Number of scored images"] == len(sources)
    assert summary.measurements["Number of non-diagnostic images"] == len(FLAGGED)
    assert summary.measurements["Non-diagnostic images for series flag"] == 3
    assert summary.measurements["Threshold Value"] == pytest.approx(-1234.5)
    assert summary.evaluations["Imaging Series Quality"] == "RID14"

    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == {
        d.SOPInstanceUID for d in sources
    }


@pytest.mark.parametrize("previous", [False, True])
def test_sr_equals_what_the_highdicom_constructor_builds(
    sources: list[Dataset], monkeypatch: pytest.MonkeyPatch, previous: bool
) -> None:
    """build_sr puts the content into a document highdicom built around its root alone (much
    faster); the result must be what highdicom's own constructor builds from the whole tree,
    element for element (the creation date and time aside)."""
    verdict = make_verdict(sources, FLAGGED)
    before = [build_sr(verdict, sources, identity=IDENTITY)] if previous else []
    kwargs = {"identity": IDENTITY, "instance_number": 2, "previous": before,
              "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1"}
    fast = build_sr(verdict, sources, **kwargs)

    def constructor(evidence: list[Dataset], root: Dataset, **rest: object) -> Dataset:
        return hd.sr.ComprehensiveSR(evidence=evidence, content=root, **rest)

    monkeypatch.setattr(build_module, "_comprehensive_sr", constructor)
    reference = build_sr(verdict, sources, **kwargs)
    assert isinstance(reference, hd.sr.ComprehensiveSR)
    clock = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"}

    def plain(ds: Dataset) -> dict[str, object]:
        ds = roundtrip(ds)
        for item in ds.get("ContributingEquipmentSequence", []):
            item.pop("ContributionDateTime", None)
        return {k: v for k, v in ds.to_json_dict().items()
                if pydicom.datadict.keyword_for_tag(int(k, 16)) not in clock}

    assert plain(fast) == plain(reference)
    assert roundtrip(fast).file_meta == roundtrip(reference).file_meta
    assert len(fast.ContentSequence) == len(reference.ContentSequence) > 3


def edge_verdict(sources: list[Dataset], edge: float) -> SeriesVerdict:
    """The same slices as FLAGGED's verdict, judged by a station's series edge: the series'
    10th-percentile score against ``edge``."""
    slices = make_verdict(sources, FLAGGED).slices
    score = -1300.0
    return SeriesVerdict.from_slices(
        study_instance_uid=sources[0].StudyInstanceUID,
        series_instance_uid=sources[0].SeriesInstanceUID, slices=slices,
        min_abnormal_slices=3, threshold=-1234.5, estimator="importance",
        model_name="brain-t1-vae", model_version="1.2.3", series_score=score,
        series_edge=edge)


def test_a_series_judged_by_its_series_edge_says_so_instead_of_a_count(
    sources: list[Dataset],
) -> None:
    """Four flagged images (the routing rule needs 3) but the 10th percentile above the edge:
    normal; below it: non-diagnostic. The summary gives the score and the edge, not a count."""
    normal = edge_verdict(sources, -1400.0)
    flagged = edge_verdict(sources, -1200.0)
    assert (normal.abnormal, flagged.abnormal) == (False, True)
    assert normal.abnormal_slices == flagged.abnormal_slices == len(FLAGGED)
    for verdict, quality in ((normal, "RID12"), (flagged, "RID14")):
        summary = measurement_groups(roundtrip(build_sr(verdict, sources, identity=IDENTITY)))[-1]
        assert summary.evaluations["Imaging Series Quality"] == quality
        assert summary.measurements["Series 10th-percentile score"] == pytest.approx(-1300.0)
        assert summary.measurements["Station series edge"] == pytest.approx(
            verdict.series_edge)
        assert "Non-diagnostic images for series flag" not in summary.measurements
        assert summary.measurements["Number of non-diagnostic images"] == len(FLAGGED)
        assert (f"series_edge={verdict.series_edge:.6g}"
                in summary.algorithm["Algorithm Parameters"])
    # The verdict cannot contradict its rule, nor name an edge without a score.
    with pytest.raises(ValueError, match="series edge"):
        dataclasses.replace(flagged, abnormal=False)
    with pytest.raises(ValueError, match="needs the series' score"):
        dataclasses.replace(flagged, series_score=None)


def test_a_series_judged_normal_gives_the_image_edge_its_images_were_judged_against(
    sources: list[Dataset], tmp_path: Path,
) -> None:
    """A station that judged the series normal judged its images against its image edge: the
    summary gives it (VAE011) and the algorithm's parameters name it. An edge can judge only
    a series judged normal, at or below the threshold, each flagged image below it."""
    normal = dataclasses.replace(edge_verdict(sources, -1400.0), image_edge=-1450.0)
    summary = measurement_groups(roundtrip(build_sr(normal, sources, identity=IDENTITY)))[-1]
    assert summary.evaluations["Imaging Series Quality"] == "RID12"
    assert summary.measurements["Station image edge"] == pytest.approx(-1450.0)
    assert summary.units["Station image edge"] == "{nat}"
    assert "image_edge=-1450" in summary.algorithm["Algorithm Parameters"]
    assert "Station image edge" not in measurement_groups(roundtrip(build_sr(
        edge_verdict(sources, -1400.0), sources, identity=IDENTITY)))[-1].measurements
    if shutil.which("dciodvfy") is not None:
        path = tmp_path / "image-edge.dcm"
        roundtrip(build_sr(normal, sources, identity=IDENTITY)).save_as(
            path, enforce_file_format=True)
        errors, warnings = dciodvfy(path)
        assert errors == [], errors
        assert all("99VAENODE" in w for w in warnings), warnings
    flagged = edge_verdict(sources, -1200.0)
    with pytest.raises(ValueError, match="only a series judged normal"):
        dataclasses.replace(flagged, image_edge=-1450.0)
    with pytest.raises(ValueError, match="at or below the threshold"):
        dataclasses.replace(normal, image_edge=-1000.0)
    # FLAGGED's images score -1500 - 10 i (-1600 to -1630): not all below an edge at -1615.
    with pytest.raises(ValueError, match="not below the image edge"):
        dataclasses.replace(normal, image_edge=-1615.0)
    with pytest.raises(ValueError, match="needs the series edge"):
        dataclasses.replace(make_verdict(sources, FLAGGED), image_edge=-1450.0)


def test_series_below_min_abnormal_slices_is_diagnostic(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, {5, 6}, min_abnormal_slices=3)
    assert not verdict.abnormal
    summary = measurement_groups(roundtrip(build_sr(verdict, sources, identity=IDENTITY)))[-1]
    assert summary.evaluations["Imaging Series Quality"] == "RID12"
    assert summary.measurements["Number of non-diagnostic images"] == 2


def test_kos_lists_flagged_images_as_quality_issue(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, FLAGGED)
    kos = build_kos(verdict, sources, identity=IDENTITY)
    assert kos is not None
    kos = roundtrip(kos)
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113010", "DCM")
    assert title.CodeValue != "113001"  # IOCM "Rejected for Quality Reasons" hides images
    assert kos_references(kos) == [sources[i].SOPInstanceUID for i in sorted(FLAGGED)]
    assert kos.StudyInstanceUID == sources[0].StudyInstanceUID
    assert kos.SeriesInstanceUID == report_series_uid(sources[0].SeriesInstanceUID, "KOS")


def test_no_kos_when_nothing_is_flagged(sources: list[Dataset]) -> None:
    assert build_kos(make_verdict(sources, set()), sources, identity=IDENTITY) is None


def _stale_reference(kos: Dataset, sr: Dataset) -> Dataset:
    """A stale KOS as the report service describes it: its UIDs, the study's attributes."""
    ref = Dataset()
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName"):
        setattr(ref, keyword, sr[keyword].value)
    ref.SeriesInstanceUID = kos.SeriesInstanceUID
    ref.SOPClassUID = kos.SOPClassUID
    ref.SOPInstanceUID = kos.SOPInstanceUID
    return ref


def test_rejection_note_withdraws_only_the_stale_kos(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, FLAGGED)
    kos = build_kos(verdict, sources, identity=IDENTITY)
    assert kos is not None
    rescored = make_verdict(sources, set())
    sr = build_sr(rescored, sources, identity=IDENTITY, instance_number=2)
    note = roundtrip(build_rejection_note(rescored, [_stale_reference(kos, sr)],
                                          identity=IDENTITY, instance_number=1))
    assert note.SOPClassUID == KeyObjectSelectionDocumentStorage
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    # Only the stale KOS is referenced, as a composite object: never an image.
    assert [i.ValueType for i in note.ContentSequence if "ReferencedSOPSequence" in i] == [
        "COMPOSITE"]
    assert kos_references(note) == [kos.SOPInstanceUID]
    evidence = note.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == kos.SeriesInstanceUID
    # Its own series, in the source study, with the patient of the study.
    assert note.SeriesInstanceUID == report_series_uid(sources[0].SeriesInstanceUID, "REJECT")
    assert note.SeriesInstanceUID not in (kos.SeriesInstanceUID, sr.SeriesInstanceUID)
    assert note.StudyInstanceUID == sources[0].StudyInstanceUID
    assert note.PatientID == sources[0].PatientID


def test_rejection_note_refuses_images_and_nothing(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, set())
    with pytest.raises(ReportError, match="at least one"):
        build_rejection_note(verdict, [], identity=IDENTITY)
    with pytest.raises(ReportError, match="not a key object selection"):
        build_rejection_note(verdict, [sources[0]], identity=IDENTITY)


def test_new_report_supersedes_in_the_same_series(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, FLAGGED)
    first = build_sr(verdict, sources, identity=IDENTITY)
    second = roundtrip(
        build_sr(verdict, sources, identity=IDENTITY, instance_number=2, previous=[first])
    )
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.InstanceNumber == 2
    pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    # The same image is the same tracked finding in both reports.
    assert [g.tracking_id for g in measurement_groups(second)] == [
        g.tracking_id for g in measurement_groups(roundtrip(first))
    ]


def test_multiframe_images_are_referenced_by_frame() -> None:
    path = get_testdata_file("emri_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SOPClassUID == EnhancedMRImageStorage
    slices = [
        SliceVerdict(ds.SOPInstanceUID, ds.SOPClassUID, f, f - 1, -900.0, 1.0, -950.0, f == 4, 0.6)
        for f in range(1, int(ds.NumberOfFrames) + 1)
    ]
    verdict = SeriesVerdict.from_slices(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        slices=slices,
        min_abnormal_slices=1,
        threshold=-920.0,
        estimator="plain",
        model_name="m",
        model_version="1",
    )
    groups = measurement_groups(roundtrip(build_sr(verdict, [ds], identity=IDENTITY)))[:-1]
    assert [g.references[0][2] for g in groups] == [(f,) for f in range(1, 11)]
    kos = build_kos(verdict, [ds], identity=IDENTITY)
    assert kos is not None and kos_references(kos) == [ds.SOPInstanceUID]


def test_image_library_describes_each_referenced_image(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, FLAGGED)
    library = image_library(roundtrip(build_sr(verdict, sources, identity=IDENTITY)))
    assert library is not None and set(library) == {ds.SOPInstanceUID for ds in sources}
    first = sources[0]
    entry = library[first.SOPInstanceUID]
    z = float(first.ImagePositionPatient[2])
    assert entry["Image Position (Patient) Z"] == pytest.approx(z)
    assert entry["Horizontal Pixel Spacing"] == pytest.approx(float(first.PixelSpacing[1]))
    # An image without a position (a derived reformat, say) cannot be described: the report
    # is still built, without a library, rather than failing.
    stripped = [deepcopy(ds) for ds in sources]  # Dataset(ds) would share (and change) ds
    del stripped[3].ImagePositionPatient
    assert image_library(roundtrip(build_sr(verdict, stripped, identity=IDENTITY))) is None


def test_enhanced_multiframe_image_gets_a_library_entry_from_its_functional_groups(
        tmp_path: Path) -> None:
    """Enhanced objects keep their geometry in functional groups; the entry describes frame 1
    (pixel measures and orientation shared or per frame, the position per frame)."""
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's eCT_Supplemental.dcm is not installed")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(ds.NumberOfFrames)
    slices = [SliceVerdict(ds.SOPInstanceUID, ds.SOPClassUID, f, f - 1, -900.0, 1.0, -950.0,
                           f == 1, 0.6) for f in range(1, frames + 1)]
    verdict = SeriesVerdict.from_slices(
        study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
        slices=slices, min_abnormal_slices=1, threshold=-920.0, estimator="plain",
        model_name="m", model_version="1")
    library = image_library(roundtrip(build_sr(verdict, [ds], identity=IDENTITY)))
    assert library is not None and list(library) == [ds.SOPInstanceUID]
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    measures = (ds.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
                or ds.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence)[0]
    entry = library[ds.SOPInstanceUID]
    assert entry["Image Position (Patient) Z"] == pytest.approx(
        float(position.ImagePositionPatient[2]))
    assert entry["Vertical Pixel Spacing"] == pytest.approx(float(measures.PixelSpacing[0]))
    assert entry["Slice Thickness"] == pytest.approx(float(measures.SliceThickness))
    if shutil.which("dciodvfy") is not None:
        out = tmp_path / "sr.dcm"
        build_sr(verdict, [ds], identity=IDENTITY).save_as(out, enforce_file_format=True)
        errors, _warnings = dciodvfy(out)
        assert errors == []


def test_missing_or_foreign_source_is_refused(sources: list[Dataset]) -> None:
    verdict = make_verdict(sources, FLAGGED)
    with pytest.raises(ReportError, match="no source dataset"):
        build_sr(verdict, sources[1:], identity=IDENTITY)
    foreign = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    with pytest.raises(ReportError, match="not to the scored series"):
        build_sr(verdict, [*sources, foreign], identity=IDENTITY)


def test_verdict_counts_must_agree() -> None:
    s = SliceVerdict("1.2.3", "1.2.840.10008.5.1.4.1.1.4", None, 0, -1.0, 0.0, -1.0, True, 0.5)
    with pytest.raises(ValueError, match="abnormal_slices"):
        SeriesVerdict("1", "2", (s,), True, 0, 1, 0.0, "importance", "m", "1")
    with pytest.raises(ValueError, match="contradicts"):
        SeriesVerdict("1", "2", (s,), False, 1, 1, 0.0, "importance", "m", "1")
    with pytest.raises(ValueError, match="confidence"):
        SliceVerdict("1.2.3", "1.2.840.10008.5.1.4.1.1.4", None, 0, -1.0, 0.0, -1.0, True, 1.5)
    with pytest.raises(ValueError, match="background"):
        SliceVerdict("1.2.3", "1.2.840.10008.5.1.4.1.1.4", None, 0, -1.0, 0.0, -1.0, True, 0.5,
                     foreground=False)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_sr_says_which_reference_judged_the_series(sources: list[Dataset],
                                                   tmp_path: Path) -> None:
    """A station still learning: the bundle's own verdict, said so in a TEXT item of the
    series summary. A calibrated station: each image also carries the bundle's own score
    before the station's reference mapped it. Both pass dciodvfy."""
    plain = make_verdict(sources, FLAGGED)
    learning = dataclasses.replace(
        plain, reference="Reference: out of the box (station learning, 7 of 20 series)")
    calibrated = dataclasses.replace(
        plain, reference="Reference: calibrated for station MR ROOM 3, protocol 't1 mprage "
                         "sag', from 17 of 20 learning series on 2026-11-27",
        slices=tuple(dataclasses.replace(s, bundle_score=s.log_likelihood * 3 + 7)
                     for s in plain.slices))
    for name, verdict in (("learning", learning), ("calibrated", calibrated)):
        sr = roundtrip(build_sr(verdict, sources, identity=IDENTITY))
        groups = measurement_groups(sr)
        assert groups[-1].texts == {"Station reference": verdict.reference}
        for s, group in zip(verdict.slices, groups[:-1], strict=True):
            assert group.measurements["Log marginal likelihood"] == pytest.approx(
                s.log_likelihood)
            if s.bundle_score is None:
                assert "Score before station reference" not in group.measurements
            else:
                assert group.measurements["Score before station reference"] == pytest.approx(
                    s.bundle_score)
                assert group.units["Score before station reference"] == "{nat}"
        path = tmp_path / f"{name}.dcm"
        sr.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy(path)
        assert errors == [], errors
        assert all("99VAENODE" in w for w in warnings), warnings
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True,
                              check=False)
        assert dump.returncode == 0 and '"Station reference")="Reference: ' in dump.stdout
    assert measurement_groups(roundtrip(build_sr(plain, sources, identity=IDENTITY)))[-1] \
        .texts == {}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_sr_kos_and_rejection_note_pass_dciodvfy_and_dsrdump(sources: list[Dataset],
                                                            tmp_path: Path) -> None:
    verdict = make_verdict(sources, FLAGGED)
    first = build_sr(verdict, sources, identity=IDENTITY)
    docs = {
        "sr.dcm": first,
        "sr-edge.dcm": build_sr(edge_verdict(sources, -1200.0), sources, identity=IDENTITY),
        "sr-superseding.dcm": build_sr(
            verdict, sources, identity=IDENTITY, instance_number=2, previous=[first]
        ),
        "kos.dcm": build_kos(verdict, sources, identity=IDENTITY),
    }
    kos = docs["kos.dcm"]
    assert kos is not None
    docs["rejection.dcm"] = build_rejection_note(
        verdict, [_stale_reference(kos, first)], identity=IDENTITY)
    titles = {"sr": "Imaging Measurement Report", "kos": "Quality Issue",
              "rejection": "Rejected for Quality Reasons"}
    for name, doc in docs.items():
        assert doc is not None
        path = tmp_path / name
        doc.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{name}: {errors}"
        # The only warnings: our private coding scheme designator is not a defined term.
        assert all("99VAENODE" in w for w in warnings), warnings
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=False)
        assert dump.returncode == 0, dump.stderr
        assert titles[name.split("-")[0].removesuffix(".dcm")] in dump.stdout


def _changed(sources: list[Dataset], change: Callable[[int, Dataset], None]) -> list[Dataset]:
    out = []
    for position, ds in enumerate(sources):
        copy = deepcopy(ds)
        change(position, copy)
        out.append(copy)
    return out


def _strip_type_2(_: int, ds: Dataset) -> None:
    for keyword in HEADER_TYPE2_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)


def _garble_type_2(_: int, ds: Dataset) -> None:
    ds.PatientBirthDate, ds.StudyDate, ds.StudyTime, ds.PatientSex = (
        "19xx0101", "20201345", "99:99", "W")


@pytest.mark.parametrize("change", [_strip_type_2, _garble_type_2])
def test_reports_are_made_without_the_type_2_header_attributes(
        sources: list[Dataset], tmp_path: Path, change: Callable[[int, Dataset], None]) -> None:
    """Anonymized and research series lack Patient Birth Date and the like (or hold values
    no parser takes): the SR, KOS and rejection note carry them empty (Type 2)."""
    changed = _changed(sources, change)
    verdict = make_verdict(changed, FLAGGED)
    sr = build_sr(verdict, changed, identity=IDENTITY)
    kos = build_kos(verdict, changed, identity=IDENTITY)
    assert kos is not None
    note = build_rejection_note(verdict, [_stale_reference(kos, sr)], identity=IDENTITY)
    for name, doc in (("sr", sr), ("kos", kos), ("note", note)):
        read = roundtrip(doc)
        for keyword in HEADER_TYPE2_KEYWORDS:
            assert keyword in read, (name, keyword)
        for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex"):
            assert not read[keyword].value, (name, keyword)
        if shutil.which("dciodvfy") is not None:
            path = tmp_path / f"{name}.dcm"
            doc.save_as(path, enforce_file_format=True)
            assert dciodvfy(path)[0] == [], name


def test_images_without_modality_get_the_series_modality(sources: list[Dataset]) -> None:
    def drop(position: int, ds: Dataset) -> None:
        if position < 3:
            del ds.Modality

    changed = _changed(sources, drop)
    sr = roundtrip(build_sr(make_verdict(changed, FLAGGED), changed, identity=IDENTITY))
    library = image_library(sr)
    assert library is not None and len(library) == len(sources)
    concepts = [str(item.ConceptCodeSequence[0].CodeMeaning) for item in sr.ContentSequence
                if "ConceptCodeSequence" in item]
    assert any(meaning.startswith("MRI") for meaning in concepts), concepts  # procedure
