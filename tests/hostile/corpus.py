"""Malformed instances made from real series, the same ones every run (a seed, not files).

Each :class:`Malformed` is what a broken or hostile sender puts on the wire: the data set bytes
and the command's SOP class and instance UIDs, which need not agree. Kinds (:data:`KINDS`):
truncations, byte flips, bad element lengths, bad VRs, hostile UIDs, mismatched SOP classes,
and structural damage (trailing bytes, elements out of order, sequences without delimiters or
nested too deep).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.filereader import data_element_generator
from pydicom.uid import ImplicitVRLittleEndian

from tests.hostile.peers import CT_IMAGE, VERIFICATION, split_file

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
_VALID_VRS = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB",
              "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM",
              "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"}
SOP_INSTANCE_TAG = 0x00080018
STUDY_TAG = 0x0020000D
SERIES_TAG = 0x0020000E
SOP_CLASS_TAG = 0x00080016

#: UIDs no sender should use: path tricks, too long, control characters, not digits and dots.
HOSTILE_UIDS = (
    "../../etc/passwd", "1.2.3/../../x", "..", "1" * 65, "1.2." + "3" * 70,
    "1.2.3\n2026-01-01 00:00:00,000 INFO    node.ingest.scp: forged line",
    "1.2.\x00.3", "1.2.3.\u00e9", "1..2", ".1.2", "1.2.3.", "1.2.abc", "1.2.3\\1.2.4",
    "1.2.3 4", "-1.2", "1.2.3\r", "C:\\x",
)
#: Affected SOP Class UIDs that do not match an MR data set, with the status each gets.
MISMATCHED_CLASSES = (CT_IMAGE, VERIFICATION, "../x", "1.2.840.10008.1.2",
                      "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.1.88.33",
                      "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.4.1")


@dataclass(frozen=True)
class Source:
    """A real instance: its data set bytes, transfer syntax and UIDs."""

    data: bytes
    syntax: str
    sop_class: str
    sop_instance: str

    @property
    def explicit(self) -> bool:
        return self.syntax != ImplicitVRLittleEndian

    @classmethod
    def read(cls, path: Path) -> Source:
        data, syntax = split_file(path.read_bytes())
        elements = {e.tag: e for e in _elements(data, syntax != ImplicitVRLittleEndian)}
        text = {tag: data[e.value_tell:e.value_tell + e.length].rstrip(b"\0 ").decode()
                for tag, e in elements.items() if tag in (SOP_CLASS_TAG, SOP_INSTANCE_TAG)}
        return cls(data, syntax, text[SOP_CLASS_TAG], text[SOP_INSTANCE_TAG])


@dataclass(frozen=True)
class Malformed:
    """One C-STORE of the corpus."""

    kind: str
    detail: str
    data: bytes
    syntax: str
    sop_class: str
    sop_instance: str


def _elements(data: bytes, explicit: bool) -> list:  # type: ignore[type-arg]
    """The top-level elements of a data set (pydicom's raw elements, with value offsets)."""
    return list(data_element_generator(BytesIO(data), not explicit, True))


def _length_field(element, explicit: bool) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(offset, size) of an element's length field."""
    if not explicit or element.VR in _LONG_VRS:
        return element.value_tell - 4, 4
    return element.value_tell - 2, 2


def with_value(source: Source, tag: int, value: bytes) -> bytes:
    """The source's data set with the value of top-level ``tag`` replaced (lengths fixed)."""
    if len(value) % 2:
        value += b"\0"
    for element in _elements(source.data, source.explicit):
        if element.tag == tag:
            offset, size = _length_field(element, source.explicit)
            field = struct.pack("<I" if size == 4 else "<H", len(value))
            end = element.value_tell + element.length
            return source.data[:offset] + field + value + source.data[end:]
    raise AssertionError(f"no element {tag:08X}")


def nested(depth: int, delimited: bool = True, group: int = 0x0040) -> bytes:
    """An explicit VR LE element (``group``,A730) holding ``depth`` nested undefined-length
    sequences (Content Sequence inside Content Sequence...)."""
    opening = (struct.pack("<HH", group, 0xA730) + b"SQ\0\0\xff\xff\xff\xff"
               + b"\xfe\xff\x00\xe0\xff\xff\xff\xff")
    closing = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
    return opening * depth + (closing * depth if delimited else closing * (depth // 2))


class _Maker:
    def __init__(self, sources: list[Source], seed: int) -> None:
        self.sources = sources
        self.rng = np.random.default_rng(seed)

    def pick(self, explicit_only: bool = False) -> Source:
        pool = [s for s in self.sources if s.explicit] if explicit_only else self.sources
        return pool[int(self.rng.integers(len(pool)))]

    def make(self, kind: str, detail: str, source: Source, data: bytes, *,
             sop_class: str | None = None, sop_instance: str | None = None) -> Malformed:
        return Malformed(kind, detail, data, source.syntax, sop_class or source.sop_class,
                         sop_instance or source.sop_instance)

    def truncation(self) -> Malformed:
        source = self.pick()
        cut = int(self.rng.integers(0, len(source.data)))
        return self.make("truncation", f"cut at {cut}", source, source.data[:cut])

    def byte_flip(self) -> Malformed:
        source = self.pick()
        data = bytearray(source.data)
        span = len(data) if self.rng.random() < 0.3 else min(len(data), 4096)
        positions = self.rng.integers(0, span, int(self.rng.integers(1, 9)))
        for position in positions:
            data[position] ^= int(self.rng.integers(1, 256))
        return self.make("byte flip", f"at {sorted(positions.tolist())}", source, bytes(data))

    def bad_length(self) -> Malformed:
        source = self.pick()
        elements = _elements(source.data, source.explicit)
        element = elements[int(self.rng.integers(len(elements)))]
        offset, size = _length_field(element, source.explicit)
        top = 0xFFFFFFFF if size == 4 else 0xFFFF
        choices = [top, element.length + 1, element.length * 2 + 7, top // 2,
                   int(self.rng.integers(0, top)), max(0, element.length - 1)]
        length = choices[int(self.rng.integers(len(choices)))]
        if length == element.length:
            length += 2
        field = struct.pack("<I" if size == 4 else "<H", length & top)
        data = source.data[:offset] + field + source.data[offset + size:]
        return self.make("bad length", f"{element.tag} length {length}", source, data)

    def bad_vr(self) -> Malformed:
        source = self.pick(explicit_only=True)
        elements = _elements(source.data, True)
        element = elements[int(self.rng.integers(len(elements)))]
        vr_offset = element.value_tell - (8 if element.VR in _LONG_VRS else 4)
        fixed = [b"ZZ", b"WS", b"zz", b"\0\0", b"A1", b"  ", b"\xff\xff"]
        letters = bytes(self.rng.integers(ord("A"), ord("Z") + 1, 2).tolist())
        vr = [*fixed, letters][int(self.rng.integers(len(fixed) + 1))]
        if vr.decode("latin-1") in _VALID_VRS:
            vr = b"ZZ"
        data = source.data[:vr_offset] + vr + source.data[vr_offset + 2:]
        return self.make("bad VR", f"{element.tag} VR {vr!r}", source, data)

    def hostile_uid(self) -> Malformed:
        source = self.pick()
        uid = HOSTILE_UIDS[int(self.rng.integers(len(HOSTILE_UIDS)))]
        tag = (SOP_INSTANCE_TAG, STUDY_TAG, SERIES_TAG)[int(self.rng.integers(3))]
        data = with_value(source, tag, uid.encode("utf-8"))
        instance = uid if tag == SOP_INSTANCE_TAG else None
        return self.make("hostile UID", f"{tag:08X} = {uid!r}", source, data,
                         sop_instance=instance)

    def mismatched_class(self) -> Malformed:
        source = self.pick()
        requested = MISMATCHED_CLASSES[int(self.rng.integers(len(MISMATCHED_CLASSES)))]
        if self.rng.random() < 0.25:  # the data set claims the request's class too
            data = with_value(source, SOP_CLASS_TAG, requested.encode())
            return self.make("class claimed", requested, source, data, sop_class=requested)
        return self.make("mismatched class", requested, source, source.data,
                         sop_class=requested)

    def structural(self) -> Malformed:
        source = self.pick(explicit_only=True)
        elements = _elements(source.data, True)
        which = int(self.rng.integers(5))
        if which == 0:
            extra = bytes(self.rng.integers(0, 256, int(self.rng.integers(1, 64))).tolist())
            return self.make("structure", "bytes after the end", source, source.data + extra)
        if which == 1:  # the first two elements swapped: tags out of order
            a, b = elements[0], elements[1]
            start_a = a.value_tell - (12 if a.VR in _LONG_VRS else 8)
            start_b = b.value_tell - (12 if b.VR in _LONG_VRS else 8)
            end_b = b.value_tell + b.length
            data = (source.data[:start_a] + source.data[start_b:end_b]
                    + source.data[start_a:start_b] + source.data[end_b:])
            return self.make("structure", "tags out of order", source, data)
        # Where (0040,A730) goes in tag order.
        after = next(e for e in elements if e.tag > 0x0040A730)
        cut = after.value_tell - (12 if after.VR in _LONG_VRS else 8)
        if which == 2:
            return self.make("structure", "sequence without its delimiter", source,
                             source.data[:cut] + nested(3, delimited=False)
                             + source.data[cut:])
        depth = int(self.rng.integers(65, 400))
        if which == 3:
            return self.make("structure", f"sequences {depth} deep", source,
                             source.data[:cut] + nested(depth) + source.data[cut:])
        return self.make("structure", "unknown VR at the end", source,
                         source.data + b"\xe1\x7f\x10\x00ZZ\x02\x00ab")


#: Kind -> how many the corpus holds.
KINDS: dict[str, tuple[Callable[[_Maker], Malformed], int]] = {
    "truncation": (_Maker.truncation, 50),
    "byte flip": (_Maker.byte_flip, 70),
    "bad length": (_Maker.bad_length, 50),
    "bad VR": (_Maker.bad_vr, 40),
    "hostile UID": (_Maker.hostile_uid, 40),
    "mismatched class": (_Maker.mismatched_class, 30),
    "structure": (_Maker.structural, 30),
}


def corpus(paths: list[Path], seed: int) -> Iterator[Malformed]:
    """The malformed instances, made from the files at ``paths`` (in this order, per kind)."""
    maker = _Maker([Source.read(p) for p in paths], seed)
    for make, count in KINDS.values():
        for _ in range(count):
            yield make(maker)
