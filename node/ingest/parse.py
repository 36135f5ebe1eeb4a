"""Check the structure of a received instance and read the few attributes ingest needs.

Why not pydicom: ``dcmread`` silently accepts a dataset cut short in the middle of a value (it
returns the bytes it found), so a truncated instance would be stored and acknowledged. This
walker checks that every element's length fits, that undefined-length sequences and
encapsulated pixel data are properly delimited, that top-level tags ascend (PS3.5 7.1), and
that the dataset ends exactly where the bytes end. It touches no pixel data and decodes nothing
but the handful of strings below, which also keeps the hot path fast.

Encodings: the file meta (PS3.10 7.1, Explicit VR Little Endian) and a dataset in Implicit VR
Little Endian, Explicit VR Little or Big Endian, Deflated Explicit VR Little Endian (inflated
here only to check it), or any encapsulated (compressed) syntax, whose dataset is Explicit VR
Little Endian (PS3.5 A.4).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from node.errors import InvalidUID, MissingAttribute, Undecodable

# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD

# (0002,xxxx) file meta
_META_TS = 0x00020010
_META_SOP_CLASS = 0x00020002
_META_SOP_INSTANCE = 0x00020003
# Top-level dataset attributes ingest reads.
_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_MODALITY = 0x00080060
_MANUFACTURER = 0x00080070
_STATION_NAME = 0x00081010
_SERIES_DESCRIPTION = 0x0008103E
_MODEL_NAME = 0x00081090
_BODY_PART = 0x00180015
_STUDY = 0x0020000D
_SERIES = 0x0020000E
_INSTANCE_NUMBER = 0x00200013
_IMAGES_IN_ACQUISITION = 0x00201002
_NUMBER_OF_FRAMES = 0x00280008
_WANTED = frozenset({_CHARSET, _SOP_CLASS, _SOP_INSTANCE, _MODALITY, _SERIES_DESCRIPTION,
                     _BODY_PART, _STUDY, _SERIES, _INSTANCE_NUMBER, _IMAGES_IN_ACQUISITION,
                     _NUMBER_OF_FRAMES, _MANUFACTURER, _STATION_NAME, _MODEL_NAME})
#: Above this an Images in Acquisition value is taken as garbage, not as a series to wait for.
_MAX_DECLARED_IMAGES = 100_000

# PS3.5 9.1: digits and dots, at most 64 characters. Components with a leading zero break the
# letter of 9.1 but occur in real scanner data; they are harmless as path names, so accepted.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: The value representations of PS3.5 6.2. Any other pair of letters in an explicit VR
#: dataset ("ZZ", "WS") is refused here: pydicom cannot read the element (nor, then, the
#: series), and the peer would otherwise have been told Success.
_VRS = frozenset(vr.encode("ascii") for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV"))
#: Deepest nesting of sequences walked (each level a sequence and an item). Real objects stay
#: far below (an SR content tree a few dozen levels); 100,000 levels ran the walker out of
#: stack and logged a 189 KB traceback per instance.
MAX_SEQUENCE_DEPTH = 64

_LE = (struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<I"))
_BE = (struct.Struct(">HH"), struct.Struct(">H"), struct.Struct(">I"))


@dataclass(frozen=True)
class ParsedInstance:
    """The attributes of a received instance that ingest stores in the queue database."""

    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_description: str | None
    body_part: str | None
    instance_number: int | None
    #: Images in Acquisition (0020,1002) of a single-frame instance: how many images its
    #: acquisition made (None when absent, not a positive number, or a multi-frame instance,
    #: whose frames are not instances). The queue waits for that many before it takes a
    #: released series as complete.
    images_in_acquisition: int | None = None
    #: Station Name (0008,1010), Manufacturer (0008,0070) and Manufacturer's Model Name
    #: (0008,1090): which scanner made the series, whatever AE title it reached the node by
    #: (several scanners behind one gateway AE stay apart on the Scanners page).
    station_name: str | None = None
    manufacturer: str | None = None
    scanner_model: str | None = None
    #: Media Storage SOP Class UID (0002,0002) of the file meta: of a received instance, the
    #: C-STORE request's Affected SOP Class UID (node/ingest/sop_class.py checks it).
    meta_sop_class_uid: str | None = None


def check_uid(value: str, name: str) -> str:
    """Return ``value`` if it is DICOM UID syntax of at most 64 characters.

    Raises:
        InvalidUID: otherwise; nothing may be written under a name built from it.
    """
    if len(value) > 64 or not _UID_RE.match(value):
        raise InvalidUID(f"{name} {value[:80]!r} is not a valid UID")
    return value


def _walk(
    buf: bytes | memoryview,
    pos: int,
    end: int,
    explicit: bool,
    little: bool,
    found: dict[int, bytes] | None,
    in_item: bool,
    depth: int = 0,
) -> int:
    """Walk elements from ``pos``; return the position after the last one.

    ``found`` collects the wanted top-level values (None below the top level). With
    ``in_item`` the walk ends at an Item Delimitation Item, which must be present. ``depth``:
    the sequences this walk is inside of.
    """
    tags, short, long_ = _LE if little else _BE
    last_tag = -1
    while pos < end:
        if pos + 8 > end:
            raise Undecodable(f"truncated element header at byte {pos}")
        group, element = tags.unpack_from(buf, pos)
        tag = (group << 16) | element
        if tag == _ITEM_DELIM:
            if not in_item:
                raise Undecodable(f"unexpected item delimiter at byte {pos}")
            return pos + 8
        if group == 0xFFFE:
            raise Undecodable(f"unexpected item tag {tag:08X} at byte {pos}")
        if found is not None:
            if tag <= last_tag:
                raise Undecodable(f"tag ({group:04X},{element:04X}) out of order at byte {pos}")
            last_tag = tag
        vr = b""
        if explicit:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr not in _VRS:
                raise Undecodable(f"invalid VR {vr!r} for ({group:04X},{element:04X})")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise Undecodable(f"truncated element header at byte {pos}")
                (length,) = long_.unpack_from(buf, pos + 8)
                pos += 12
            else:
                (length,) = short.unpack_from(buf, pos + 6)
                pos += 8
        else:
            (length,) = long_.unpack_from(buf, pos + 4)
            pos += 8
        if length == _UNDEFINED:
            if explicit and vr not in (b"SQ", b"OB", b"OW", b"UN"):
                raise Undecodable(f"undefined length with VR {vr!r} at byte {pos}")
            # PS3.5 6.2.2: UN of undefined length holds an Implicit VR Little Endian sequence.
            if depth >= MAX_SEQUENCE_DEPTH:
                raise Undecodable(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
            if vr == b"UN":
                pos = _walk_items(buf, pos, end, False, True, depth + 1)
            else:
                pos = _walk_items(buf, pos, end, explicit, little, depth + 1)
            continue
        if pos + length > end:
            raise Undecodable(
                f"value of ({group:04X},{element:04X}) needs {length} bytes, "
                f"{end - pos} left"
            )
        if found is not None and tag in _WANTED:
            found[tag] = bytes(buf[pos : pos + length])
        pos += length
    if in_item:
        raise Undecodable("item without its delimiter")
    return pos


def _walk_items(
    buf: bytes | memoryview, pos: int, end: int, explicit: bool, little: bool, depth: int
) -> int:
    """Walk the items of an undefined-length sequence (or encapsulated pixel data) up to and
    including the Sequence Delimitation Item."""
    tags, _, long_ = _LE if little else _BE
    while pos + 8 <= end:
        group, element = tags.unpack_from(buf, pos)
        tag = (group << 16) | element
        (length,) = long_.unpack_from(buf, pos + 4)
        pos += 8
        if tag == _SEQ_DELIM:
            return pos
        if tag != _ITEM:
            raise Undecodable(f"expected an item, found ({group:04X},{element:04X})")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, explicit, little, None, in_item=True, depth=depth)
        elif pos + length > end:
            raise Undecodable(f"item needs {length} bytes, {end - pos} left")
        else:
            pos += length
    raise Undecodable("sequence without its delimiter")


def _text(raw: bytes | None, encoding: str = "ascii") -> str | None:
    if raw is None:
        return None
    value = raw.rstrip(b" \x00").decode(encoding, errors="replace").strip()
    return value or None


def _clip(value: str | None, length: int) -> str | None:
    # Column widths of the queue database; a longer value is a broken sender's, not a reason
    # to refuse the instance.
    return value[:length] if value is not None else None


def _uid_text(raw: bytes | None) -> str | None:
    """A UI value without its padding (trailing NUL, or the space some senders use), nothing
    else taken away: a UID with a line break or a leading space is not one."""
    if raw is None:
        return None
    return raw.rstrip(b" \x00").decode("ascii", errors="replace") or None


def _uid(found: dict[int, bytes], tag: int, name: str) -> str:
    value = _uid_text(found.get(tag))
    if value is None:
        raise MissingAttribute(f"{name} is missing")
    return check_uid(value, name)


def _positive_int(raw: bytes | None) -> int | None:
    """An IS value as a positive int, None when absent or not one (IS is free text in
    practice)."""
    text = _text(raw)
    try:
        value = int(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _encoding(charset: bytes | None) -> str:
    # Only what ingest needs: series description and body part, for display and routing.
    text = (charset or b"").decode("ascii", errors="replace")
    return "utf-8" if "ISO_IR 192" in text else "latin-1"


def parse_instance(data: bytes) -> ParsedInstance:
    """Check a received instance (preamble, ``DICM``, file meta, dataset) and read its UIDs.

    Raises:
        Undecodable: not a DICOM file, or a malformed, truncated or trailing-garbage dataset.
        MissingAttribute: a required UID is absent.
        InvalidUID: a UID is not DICOM UID syntax.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Undecodable("no DICOM preamble and prefix")
    view = memoryview(data)
    # File meta: group 0002 elements, Explicit VR Little Endian, directly after the prefix.
    meta: dict[int, bytes] = {}
    pos = 132
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        (element,) = _LE[1].unpack_from(view, pos + 2)
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = _LE[2].unpack_from(view, pos + 8)
            pos += 12
        else:
            (length,) = _LE[1].unpack_from(view, pos + 6)
            pos += 8
        if length == _UNDEFINED or pos + length > len(data):
            raise Undecodable("truncated file meta information")
        meta[0x00020000 | element] = bytes(view[pos : pos + length])
        pos += length
    ts = _uid_text(meta.get(_META_TS))
    if ts is None:
        raise Undecodable("file meta has no transfer syntax")
    check_uid(ts, "TransferSyntaxUID")

    body: bytes | memoryview = view[pos:]
    explicit, little = True, True
    if ts == ImplicitVRLittleEndian:
        explicit = False
    elif ts == ExplicitVRBigEndian:
        little = False
    elif ts == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(bytes(body))
        except zlib.error as exc:
            raise Undecodable(f"deflated dataset does not inflate: {exc}") from exc
        if not inflater.eof:
            raise Undecodable("deflated dataset is truncated")

    found: dict[int, bytes] = {}
    _walk(body, 0, len(body), explicit, little, found, in_item=False)

    # Values of a big-endian dataset are strings here, byte order does not matter for them.
    sop_instance = _uid(found, _SOP_INSTANCE, "SOPInstanceUID")
    meta_instance = _uid_text(meta.get(_META_SOP_INSTANCE))
    if meta_instance is not None:
        check_uid(meta_instance, "the request's SOP Instance UID")
    if meta_instance is not None and meta_instance != sop_instance:
        raise Undecodable(
            f"SOPInstanceUID {sop_instance!r} differs from the request's {meta_instance[:80]!r}"
        )
    encoding = _encoding(found.get(_CHARSET))
    number = _text(found.get(_INSTANCE_NUMBER))
    try:
        instance_number = int(number) if number is not None else None
    except ValueError:
        instance_number = None  # IS is free text in practice; ordering falls back elsewhere
    declared = _positive_int(found.get(_IMAGES_IN_ACQUISITION))
    frames = _positive_int(found.get(_NUMBER_OF_FRAMES))
    if declared is not None and (declared > _MAX_DECLARED_IMAGES or (frames or 1) > 1):
        declared = None
    return ParsedInstance(
        transfer_syntax_uid=ts,
        sop_class_uid=_uid(found, _SOP_CLASS, "SOPClassUID"),
        sop_instance_uid=sop_instance,
        study_instance_uid=_uid(found, _STUDY, "StudyInstanceUID"),
        series_instance_uid=_uid(found, _SERIES, "SeriesInstanceUID"),
        modality=_clip(_text(found.get(_MODALITY)), 16),
        series_description=_clip(_text(found.get(_SERIES_DESCRIPTION), encoding), 256),
        body_part=_clip(_text(found.get(_BODY_PART), encoding), 64),
        instance_number=instance_number,
        images_in_acquisition=declared,
        station_name=_clip(_text(found.get(_STATION_NAME), encoding), 64),
        manufacturer=_clip(_text(found.get(_MANUFACTURER), encoding), 64),
        scanner_model=_clip(_text(found.get(_MODEL_NAME), encoding), 64),
        meta_sop_class_uid=_uid_text(meta.get(_META_SOP_CLASS)),
    )
