"""Turn a series verdict into DICOM: a TID 1500 Comprehensive SR and, if needed, a KOS.

Pure: datasets in, datasets out, no disk or network I/O (``report/service.py`` stores them,
``report/push.py`` sends them).

The Structured Report (PS3.16 TID 1500 "Measurement Report") has one measurement group
(TID 1501) per scored image. Each group references its image (SOP Class, SOP Instance and, for
multi-frame instances, the frame) and carries:

- the estimated log marginal likelihood log p(x) and, for completeness, the KL divergence and
  the ELBO (codes of our private scheme ``99VAENODE``, declared in the Coding Scheme
  Identification Sequence as PS3.3 C.12.1.1.5 asks, since no standard code names them);
- the confidence of the verdict as "Certainty of Finding" (DCM 111012, percent), the concept CAD
  reports use for how sure an algorithm is;
- an "Image Quality" (DCM 111101) qualitative evaluation whose value comes from CID 7036 "Image
  Quality Assessment": RadLex RID12 "Diagnostic quality" or RID14 "Non-diagnostic quality";
- the algorithm (TID 4019: name, version, and its parameters, among them the threshold).

A last group summarises the series: "Imaging Series Quality" (DCM 130550) with a CID 7036
value, the numbers of scored and flagged images, the slices that make a series abnormal (or,
where a calibrated station judged it, its 10th-percentile score, the station's series edge and,
in a series judged normal, the image edge its images were judged against) and the threshold
(DCM 122411 "Threshold Value").

When any image is flagged, a Key Object Selection document titled "Quality Issue"
(DCM 113010) lists the flagged images. Not "Rejected for Quality Reasons" (113001): PACS that
follow IHE IOCM hide the images a 113001 KOS lists, and the node only advises.

When a series is scored again after its "Quality Issue" KOS reached a PACS, that KOS is stale
(the new one lists other images, or none is written because nothing is flagged any more), and
no C-STORE can take it back. The node then sends an IHE IOCM rejection note
(:func:`build_rejection_note`): a KOS titled "Rejected for Quality Reasons" (113001) whose only
references are the node's own stale "Quality Issue" documents, never an image, so that a PACS
that follows IOCM hides the stale flag; a PACS that does not shows the note beside it.

Report UIDs: the SR series and the KOS series are derived from the source series UID, so that a
later report on the same series lands in the same report series (a new instance that names its
predecessor, PS3.3 C.17.2.3 Predecessor Documents Sequence) rather than in a new series.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)

from node.errors import ReportError
from node.functional_groups import functional_group_item
from node.report.content import SeriesVerdict, SliceVerdict
from node.report.header import header_source, series_modality, view_of

# --- codes -----------------------------------------------------------------------------------

#: Designator of our private coding scheme (PS3.3 8.2: designators beginning "99" are private).
PRIVATE_SCHEME = "99VAENODE"
PRIVATE_SCHEME_NAME = "vaenode quality-gate concepts"
PRIVATE_SCHEME_ORGANIZATION = "vaenode project"

LOG_MARGINAL_LIKELIHOOD = Code("VAE001", PRIVATE_SCHEME, "Log marginal likelihood")
KL_DIVERGENCE = Code("VAE002", PRIVATE_SCHEME, "KL divergence to prior")
EVIDENCE_LOWER_BOUND = Code("VAE003", PRIVATE_SCHEME, "Evidence lower bound")
SCORED_IMAGES = Code("VAE004", PRIVATE_SCHEME, "Number of scored images")
FLAGGED_IMAGES = Code("VAE005", PRIVATE_SCHEME, "Number of non-diagnostic images")
MIN_FLAGGED_IMAGES = Code("VAE006", PRIVATE_SCHEME, "Non-diagnostic images for series flag")
#: The reference that judged the series (a station's own, or the bundle's out of the box).
STATION_REFERENCE = Code("VAE007", PRIVATE_SCHEME, "Station reference")
#: The bundle's own score of an image before the station's reference mapped it.
BUNDLE_SCORE = Code("VAE008", PRIVATE_SCHEME, "Score before station reference")
#: Where a calibrated station judges a series by one number: the series' 10th-percentile image
#: score, and the station's series edge below which the series is non-diagnostic.
SERIES_SCORE = Code("VAE009", PRIVATE_SCHEME, "Series 10th-percentile score")
SERIES_EDGE = Code("VAE010", PRIVATE_SCHEME, "Station series edge")
#: Where such a station judged the series normal: the score below which an image of it is
#: non-diagnostic, in place of the threshold.
IMAGE_EDGE = Code("VAE011", PRIVATE_SCHEME, "Station image edge")

#: log p(x) of a continuous density in natural-log units; UCUM annotation syntax.
NAT = Code("{nat}", "UCUM", "nat")
IMAGES = Code("{images}", "UCUM", "images")
PERCENT = codes.UCUM.Percent

#: CID 7036 "Image Quality Assessment" values (RadLex).
DIAGNOSTIC_QUALITY = codes.cid7036.DiagnosticQuality  # RID12
NON_DIAGNOSTIC_QUALITY = codes.cid7036.NonDiagnosticQuality  # RID14

IMAGE_QUALITY = codes.DCM.ImageQuality  # 111101
SERIES_QUALITY = codes.DCM.ImagingSeriesQuality  # 130550
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding  # 111012
THRESHOLD_VALUE = codes.DCM.ThresholdValue  # 122411
QUALITY_ISSUE = codes.DCM.QualityIssue  # 113010, KOS document title (CID 7010)
#: IHE IOCM rejection note title (CID 7011), used only to withdraw the node's own stale KOS.
REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # 113001

#: Series numbers of the report series. IS values with no meaning beyond sorting report
#: series after the acquired ones in a viewer's series list.
SR_SERIES_NUMBER = 9901
KOS_SERIES_NUMBER = 9902
REJECTION_SERIES_NUMBER = 9903

#: Report kinds, each in a report series of its own per source series.
REPORT_KINDS = ("SR", "KOS", "REJECT")

_PROCEDURE_BY_MODALITY = {
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
}


#: Name-based UUID namespace for the node's derived UIDs (itself derived, not a literal UID).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "vaenode.invalid")


def stable_uid(*parts: str) -> UID:
    """A UID that is the same every time for the same parts (PS3.5 B.2: 2.25 + UUID).

    ``pydicom.uid.generate_uid(prefix=None)`` ignores its entropy sources and is random, so a
    name-based UUID (RFC 4122 version 5) is used to make the report series of a source series,
    the device UID and the tracking UIDs reproducible.
    """
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}")


@dataclass(frozen=True)
class ReportIdentity:
    """Who writes the reports: the node, as a device observer (TID 1004).

    Attributes:
        ae_title: the node's AE title, used as the device name and to derive its device UID.
        software_version: the node's software version (Software Versions in the SR header).
        manufacturer: written into the General Equipment module.
        institution_name: optional, copied into the report header.
    """

    ae_title: str
    software_version: str
    manufacturer: str = "vaenode"
    institution_name: str | None = None

    @property
    def device_uid(self) -> str:
        """A stable UID for this node (2.25 UUID form), the same in every report it writes."""
        return str(stable_uid("device", self.ae_title))


def report_series_uid(source_series_uid: str, kind: str) -> UID:
    """The report series of a source series: the same for every report on that series.

    Args:
        source_series_uid: Series Instance UID of the scored series.
        kind: one of ``REPORT_KINDS`` (SR and KOS have different modalities, hence different
            series; rejection notes get a series of their own, as IOCM expects).
    """
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    return stable_uid("report-series", kind, source_series_uid)


def _tracking_uid(series_uid: str, sop_instance_uid: str, frame: int | None) -> UID:
    # Stable across superseding reports: the same image is the same tracked finding.
    return stable_uid("finding", series_uid, sop_instance_uid, str(frame))


def _index_sources(verdict: SeriesVerdict, sources: Iterable[Dataset]) -> dict[str, Dataset]:
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        if ds.SeriesInstanceUID != verdict.series_instance_uid:
            raise ReportError(
                f"source instance {ds.SOPInstanceUID} belongs to series {ds.SeriesInstanceUID}, "
                f"not to the scored series {verdict.series_instance_uid}"
            )
        by_uid[ds.SOPInstanceUID] = ds
    missing = {s.sop_instance_uid for s in verdict.slices} - by_uid.keys()
    if missing:
        raise ReportError(
            f"{len(missing)} scored instance(s) have no source dataset, e.g. {sorted(missing)[0]}"
        )
    if not verdict.slices:
        raise ReportError(f"series {verdict.series_instance_uid} has no scored image to report")
    return by_uid


def _evidence(verdict: SeriesVerdict, by_uid: dict[str, Dataset]) -> list[Dataset]:
    # One dataset per referenced instance, in stack order (a multi-frame instance once).
    seen: dict[str, Dataset] = {}
    for s in verdict.slices:
        seen.setdefault(s.sop_instance_uid, by_uid[s.sop_instance_uid])
    return list(seen.values())


def _algorithm(verdict: SeriesVerdict) -> hd.sr.AlgorithmIdentification:
    parameters = [
        f"estimator={verdict.estimator}",
        f"threshold_log_likelihood={verdict.threshold:.6g}",
        f"min_abnormal_slices={verdict.min_abnormal_slices}"
        if verdict.series_edge is None else f"series_edge={verdict.series_edge:.6g}",
    ]
    if verdict.image_edge is not None:
        parameters.append(f"image_edge={verdict.image_edge:.6g}")
    if verdict.samples is not None:
        parameters.append(f"samples={verdict.samples}")
    if verdict.rule:
        parameters.append(f"routing_rule={verdict.rule}")
    if verdict.score_note:
        parameters.append(f"score={verdict.score_note}")
    return hd.sr.AlgorithmIdentification(
        name=verdict.model_name, version=verdict.model_version, parameters=parameters
    )


def _quality(abnormal: bool) -> Code:
    return NON_DIAGNOSTIC_QUALITY if abnormal else DIAGNOSTIC_QUALITY


def _slice_group(
    verdict: SeriesVerdict, s: SliceVerdict, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    frames = [s.frame] if s.frame is not None else None
    label = f"image {s.index + 1}" + (f" frame {s.frame}" if s.frame is not None else "")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_tracking_uid(verdict.series_instance_uid, s.sop_instance_uid, s.frame),
            identifier=label,
        ),
        finding_type=IMAGE_QUALITY,
        algorithm_id=algorithm,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=s.sop_class_uid,
                referenced_sop_instance_uid=s.sop_instance_uid,
                referenced_frame_numbers=frames,
            )
        ],
        measurements=[
            hd.sr.Measurement(name=LOG_MARGINAL_LIKELIHOOD, value=s.log_likelihood, unit=NAT),
            hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=100.0 * s.confidence, unit=PERCENT),
            hd.sr.Measurement(name=KL_DIVERGENCE, value=s.kl, unit=NAT),
            hd.sr.Measurement(name=EVIDENCE_LOWER_BOUND, value=s.elbo, unit=NAT),
        ] + ([] if s.bundle_score is None else
             [hd.sr.Measurement(name=BUNDLE_SCORE, value=s.bundle_score, unit=NAT)]),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=IMAGE_QUALITY, value=_quality(s.abnormal))
        ],
    )


def _series_rule(verdict: SeriesVerdict) -> list[hd.sr.Measurement]:
    """What made the series verdict: the count of images that flag it, or, where a station
    judged it by one number, that number and the station's series edge (and, where it judged
    the series normal, the image edge its images were judged against)."""
    if verdict.series_edge is None or verdict.series_score is None:
        return [hd.sr.Measurement(name=MIN_FLAGGED_IMAGES, value=verdict.min_abnormal_slices,
                                  unit=IMAGES)]
    return [hd.sr.Measurement(name=SERIES_SCORE, value=verdict.series_score, unit=NAT),
            hd.sr.Measurement(name=SERIES_EDGE, value=verdict.series_edge, unit=NAT),
            *([] if verdict.image_edge is None else
              [hd.sr.Measurement(name=IMAGE_EDGE, value=verdict.image_edge, unit=NAT)])]


def _series_group(
    verdict: SeriesVerdict, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=stable_uid("series-finding", verdict.series_instance_uid),
            identifier="series summary",
        ),
        finding_type=SERIES_QUALITY,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=SCORED_IMAGES, value=len(verdict.slices), unit=IMAGES),
            hd.sr.Measurement(name=FLAGGED_IMAGES, value=verdict.abnormal_slices, unit=IMAGES),
            *_series_rule(verdict),
            hd.sr.Measurement(name=THRESHOLD_VALUE, value=verdict.threshold, unit=NAT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=SERIES_QUALITY, value=_quality(verdict.abnormal))
        ],
    )
    if verdict.reference:
        # Which reference judged the series, as a TEXT item of the summary group: readers see
        # whether the verdict is the bundle's own (a station still learning) or a station's.
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=STATION_REFERENCE, value=verdict.reference[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _observer(identity: ReportIdentity, verdict: SeriesVerdict) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.ae_title,
            manufacturer_name=identity.manufacturer,
            model_name=verdict.model_name,
        ),
    )


def _private_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item


def _header(doc: Dataset, identity: ReportIdentity, description: str) -> None:
    doc.SeriesDescription = description
    doc.SoftwareVersions = identity.software_version


#: What highdicom reads to describe a cross-sectional image in the Image Library (TID 1604).
_LIBRARY_GEOMETRY = ("PixelSpacing", "SliceThickness", "ImageOrientationPatient",
                     "ImagePositionPatient")


def _library_entry(ds: Dataset, modality: str) -> Dataset | None:
    """What an Image Library entry (TID 1601) is described from, or None when it cannot be.

    highdicom reads the geometry from top-level attributes. An enhanced multi-frame image
    keeps it in functional groups (PS3.3 C.7.6.16), which highdicom does not read: it gets a
    view holding its identity and its first frame's pixel measures, orientation and position.
    An image without Modality (a series attribute) gets a view with the series' ``modality``.
    """
    if not modality or not all(k in ds for k in ("FrameOfReferenceUID", "Rows", "Columns")):
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        if not all(k in ds for k in _LIBRARY_GEOMETRY):
            return None
        if ds.get("Modality"):
            return ds
        view = view_of(ds)
        view.Modality = modality
        return view
    measures = functional_group_item(ds, 0, "PixelMeasuresSequence")
    orientation = functional_group_item(ds, 0, "PlaneOrientationSequence")
    position = functional_group_item(ds, 0, "PlanePositionSequence")
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        setattr(view, keyword, ds[keyword].value)
    view.Modality = ds.get("Modality") or modality
    groups = (measures, measures, orientation, position)  # where each _LIBRARY_GEOMETRY lives
    for keyword, item in zip(_LIBRARY_GEOMETRY, groups, strict=True):
        if item is None or keyword not in item:
            return None
        setattr(view, keyword, item[keyword].value)
    return view


def _measurement_report(
    identity: ReportIdentity,
    verdict: SeriesVerdict,
    procedure: Code,
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations],
    evidence: list[Dataset],
) -> hd.sr.MeasurementReport:
    # The Image Library describes every referenced image for viewers; it is left out (as
    # highdicom allows) when some image lacks the attributes its entries are made from.
    modality = series_modality(evidence)
    entries = [e for ds in evidence if (e := _library_entry(ds, modality)) is not None]
    library = entries if len(entries) == len(evidence) else None
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=_observer(identity, verdict)
        ),
        procedure_reported=procedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=library,
    )


def _comprehensive_sr(evidence: list[Dataset], root: Dataset, **kwargs: Any) -> Dataset:
    """``hd.sr.ComprehensiveSR(evidence, root, **kwargs)`` as a plain dataset, in a fraction
    of the time.

    highdicom's constructor deep-copies the content tree, parses the copy back into its
    content-item classes and searches the tree three times (for image and composite
    references, to check them against ``evidence``, and for SCOORD3D items): about 3 s of the
    4 s a 150-image report took. Here it builds the document around the root container
    without its children (the same header modules, and the evidence sequences from
    ``evidence``, which lists every instance the content references: :func:`_evidence`), and
    the children are put in afterwards. The result is a pydicom ``Dataset`` (with the file
    meta information), not highdicom's class, whose parsed view of the content would be the
    empty skeleton's; ``tests/report/test_report_build.py`` checks it equals what the
    constructor itself builds, element for element.
    """
    skeleton = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            skeleton.add(elem)
    skeleton.ContentSequence = []
    built = hd.sr.ComprehensiveSR(evidence=evidence, content=skeleton, **kwargs)
    doc = Dataset(built)
    doc.file_meta = built.file_meta
    doc.preamble = built.preamble
    doc.ContentSequence = root.ContentSequence
    return doc


def build_sr(
    verdict: SeriesVerdict,
    sources: Sequence[Dataset],
    *,
    identity: ReportIdentity,
    instance_number: int = 1,
    previous: Sequence[Dataset] = (),
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build the TID 1500 measurement report of one scored series.

    Args:
        verdict: the scores and verdicts.
        sources: the scored instances' datasets (headers suffice: read them with
            ``stop_before_pixels=True``); each scored SOP Instance UID must be among them.
        identity: the node as the device observer.
        instance_number: Instance Number of the report in its report series.
        previous: earlier reports on this series that this one supersedes (their UIDs go into
            the Predecessor Documents Sequence).
        sop_instance_uid: the report's SOP Instance UID (new one when None).

    Returns:
        The Comprehensive SR (a pydicom ``Dataset``; see :func:`_comprehensive_sr`), in the
        source study, in the series ``report_series_uid(..., "SR")``.

    Raises:
        ReportError: a source is missing, belongs to another series, or nothing was scored.
    """
    by_uid = _index_sources(verdict, sources)
    evidence = _evidence(verdict, by_uid)
    first = evidence[0]
    if first.StudyInstanceUID != verdict.study_instance_uid:
        raise ReportError(
            f"sources are in study {first.StudyInstanceUID}, verdict says "
            f"{verdict.study_instance_uid}"
        )
    algorithm = _algorithm(verdict)
    groups = [_slice_group(verdict, s, algorithm) for s in verdict.slices]
    groups.append(_series_group(verdict, algorithm))
    procedure = _PROCEDURE_BY_MODALITY.get(series_modality(evidence),
                                           codes.cid100.ImagingProcedure)
    report = _measurement_report(identity, verdict, procedure, groups, evidence)
    sr = _comprehensive_sr(
        evidence=header_source(evidence),
        root=report[0],
        series_instance_uid=report_series_uid(verdict.series_instance_uid, "SR"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        institution_name=identity.institution_name,
        is_complete=True,
        is_final=False,
        previous_versions=list(previous) or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    flagged = verdict.abnormal_slices
    _header(
        sr,
        identity,
        f"vaenode quality: {flagged}/{len(verdict.slices)} non-diagnostic"
        + (" (SERIES FLAGGED)" if verdict.abnormal else ""),
    )
    # The SR uses codes of our private scheme: declare it (PS3.3 C.12.1.1.5).
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def build_kos(
    verdict: SeriesVerdict,
    sources: Sequence[Dataset],
    *,
    identity: ReportIdentity,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """Build the "Quality Issue" Key Object Selection listing the flagged images, if any.

    Args:
        verdict: the scores and verdicts.
        sources: as for :func:`build_sr`.
        identity: the node as the device observer.
        instance_number: Instance Number of the KOS in its report series.
        sop_instance_uid: the document's SOP Instance UID (new one when None).

    Returns:
        The KOS document, or None when no image is flagged (nothing to select).

    Raises:
        ReportError: as for :func:`build_sr`.
    """
    by_uid = _index_sources(verdict, sources)
    flagged = verdict.flagged
    if not flagged:
        return None
    selected: dict[str, Dataset] = {}
    for s in flagged:
        selected.setdefault(s.sop_instance_uid, by_uid[s.sop_instance_uid])
    objects = list(selected.values())
    description = (
        f"vaenode: {len(flagged)} of {len(verdict.slices)} images below the quality threshold "
        f"(model {verdict.model_name} {verdict.model_version}); advisory, not a rejection"
    )
    return _key_object_document(
        verdict, identity, QUALITY_ISSUE, objects, description, "KOS", KOS_SERIES_NUMBER,
        instance_number, sop_instance_uid, f"vaenode quality issue: {len(flagged)} images")


def build_rejection_note(
    verdict: SeriesVerdict,
    stale: Sequence[Dataset],
    *,
    identity: ReportIdentity,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build the IOCM rejection note that withdraws the node's own stale "Quality Issue" KOS.

    Args:
        verdict: the new verdict on the series (its model names the observer device).
        stale: one dataset per withdrawn KOS, with its Study, Series, SOP Class and SOP
            Instance UIDs and the patient and study attributes of the study (the new SR's
            serve: same study).
        identity: the node as the device observer.
        instance_number: Instance Number of the note in its report series.
        sop_instance_uid: the note's SOP Instance UID (new one when None).

    Raises:
        ReportError: nothing to withdraw, or a reference that is not a KOS of this study.
    """
    if not stale:
        raise ReportError("a rejection note needs at least one KOS to withdraw")
    for ds in stale:
        if (ds.SOPClassUID != KeyObjectSelectionDocumentStorage
                or ds.StudyInstanceUID != verdict.study_instance_uid):
            raise ReportError(f"{ds.SOPInstanceUID} is not a key object selection of study "
                              f"{verdict.study_instance_uid}")
    description = (
        f"vaenode: the series was scored again (model {verdict.model_name} "
        f"{verdict.model_version}); this withdraws {len(stale)} earlier 'Quality Issue' "
        "selection(s) of the node, not any image"
    )
    return _key_object_document(
        verdict, identity, REJECTED_FOR_QUALITY_REASONS, list(stale), description, "REJECT",
        REJECTION_SERIES_NUMBER, instance_number, sop_instance_uid,
        f"vaenode withdrawn quality flags: {len(stale)}")


def _key_object_document(
    verdict: SeriesVerdict,
    identity: ReportIdentity,
    title: Code,
    objects: list[Dataset],
    description: str,
    kind: str,
    series_number: int,
    instance_number: int,
    sop_instance_uid: str | None,
    series_description: str,
) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection document of the node (TID 2010) titled ``title``, listing
    ``objects``, in the report series of ``kind``."""
    content = hd.ko.KeyObjectSelection(
        document_title=title,
        referenced_objects=objects,
        observer_device_context=_observer(identity, verdict),
        description=description[:1024],
    )
    doc = hd.ko.KeyObjectSelectionDocument(
        evidence=header_source(objects),
        content=content,
        series_instance_uid=report_series_uid(verdict.series_instance_uid, kind),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        institution_name=identity.institution_name,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    _header(doc, identity, series_description)
    return doc
