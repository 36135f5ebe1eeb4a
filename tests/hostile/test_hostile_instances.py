"""Malformed and hostile instances sent to a real node (issue 19, items 4, 5, 7, 9).

pynetdicom is the SCU (it sends whatever command values and data set bytes it is given),
DCMTK ``echoscu`` checks that the node keeps answering. Each status is the one CONFORMANCE.md
promises for the case.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Iterator

import pytest

from tests.helpers.dcmtk import echoscu
from tests.helpers.node import RunningNode
from tests.hostile.conftest import FORREST, TRIO, series_files
from tests.hostile.corpus import (
    MISMATCHED_CLASSES,
    SOP_CLASS_TAG,
    SOP_INSTANCE_TAG,
    Source,
    corpus,
    nested,
    with_value,
)
from tests.hostile.peers import (
    CONFORMANCE,
    CT_IMAGE,
    MR_IMAGE,
    VERIFICATION,
    RawStoreSCU,
    conformance_status,
    listeners_rss_kib,
    stored_bytes,
)

pytestmark = pytest.mark.e2e

SEED = 19
#: Most growth of a listener's resident memory over the whole corpus, KiB. The corpus is
#: about 34 MB of data sets: keeping them (or allocating what a length claims) would pass
#: it; a listener holds one instance at a time, and its caches grew by 4-6 MiB here.
RSS_BOUND_KIB = 16 * 1024


_FRESH = itertools.count(1)


@pytest.fixture
def source() -> Source:
    """A real instance under a SOP Instance UID of its own (nothing else sends it)."""
    real = Source.read(series_files(TRIO, 1)[0])
    uid = f"2.25.19{next(_FRESH)}"
    return Source(with_value(real, SOP_INSTANCE_TAG, uid.encode()), real.syntax,
                  real.sop_class, uid)


@pytest.fixture
def scu(open_node: RunningNode) -> Iterator[RawStoreSCU]:
    sender = RawStoreSCU(open_node, (MR_IMAGE,))
    try:
        yield sender
    finally:
        sender.release()


def _after_pixels(source: Source, element: bytes) -> bytes:
    """The source's data set with ``element`` (a private group 7FE1 element) appended: after
    the pixel data, in tag order."""
    return source.data + element


def _failure_statuses() -> set[int]:
    """The failure statuses of CONFORMANCE.md 2.5 (one row each)."""
    section = CONFORMANCE.read_text(encoding="utf-8").split("### 2.5")[1].split("###")[0]
    return {int(s, 16) for s in re.findall(r"^\| 0x([0-9A-F]{4}) \|", section, re.M)} - {0}


@pytest.mark.parametrize("vr", [b"ZZ", b"WS"])
def test_an_unknown_vr_is_refused_at_ingest(open_node: RunningNode, scu: RawStoreSCU,
                                            source: Source, vr: bytes) -> None:
    data = _after_pixels(source, b"\xe1\x7f\x10\x00" + vr + b"\x02\x00ab")
    status = scu.store(data, sop_class=source.sop_class, sop_instance=source.sop_instance,
                       syntax=source.syntax)
    assert status == conformance_status("unknown VR") == 0xC210
    assert stored_bytes(open_node, source.sop_instance) is None


@pytest.mark.parametrize(("requested", "case"), [
    ("../x", "SOP Class UID not UID syntax"),
    (VERIFICATION, "SOP class differs from the data set's"),
    (CT_IMAGE, "SOP class differs from the data set's"),
])
def test_a_sop_class_that_is_not_the_data_sets_is_refused(
        open_node: RunningNode, scu: RawStoreSCU, source: Source, requested: str,
        case: str) -> None:
    status = scu.store(source.data, sop_class=requested, sop_instance=source.sop_instance,
                       syntax=source.syntax)
    assert status == conformance_status(case)
    assert stored_bytes(open_node, source.sop_instance) is None
    # The same instance under its own class is stored, as sent.
    assert scu.store(source.data, sop_class=source.sop_class,
                     sop_instance=source.sop_instance, syntax=source.syntax) == 0x0000
    assert stored_bytes(open_node, source.sop_instance) == source.data


def test_a_data_set_of_another_services_class_is_refused(
        open_node: RunningNode, scu: RawStoreSCU, source: Source) -> None:
    data = with_value(source, SOP_CLASS_TAG, VERIFICATION.encode())
    status = scu.store(data, sop_class=VERIFICATION, sop_instance=source.sop_instance,
                       syntax=source.syntax)
    assert status == conformance_status("SOP class of another service") == 0xA900
    assert stored_bytes(open_node, source.sop_instance) is None


def test_sequences_100000_deep_are_refused_in_one_short_line(
        open_node: RunningNode, scu: RawStoreSCU, source: Source) -> None:
    before = len(open_node.log_text())
    data = _after_pixels(source, nested(100_000, group=0x7FE1))
    status = scu.store(data, sop_class=source.sop_class, sop_instance=source.sop_instance,
                       syntax=source.syntax)
    assert status == conformance_status("sequences nested too deep") == 0xC210
    new = open_node.log_text()[before:]
    lines = [line for line in new.splitlines() if "nested deeper" in line]
    assert len(lines) == 1 and len(lines[0]) < 500, new[-2000:]
    assert "Traceback" not in new


def test_a_line_break_in_a_uid_cannot_forge_a_log_line(
        open_node: RunningNode, scu: RawStoreSCU, source: Source) -> None:
    uid = "1.2\x00.3\n2026-01-01 00:00:00,000 INFO    node.ingest.scp: ok"
    assert len(uid) <= 64  # what pynetdicom lets through to the node
    data = with_value(source, SOP_INSTANCE_TAG, uid.encode())
    before = len(open_node.log_text())
    status = scu.store(data, sop_class=source.sop_class, sop_instance=uid,
                       syntax=source.syntax)
    assert status == conformance_status("control characters in a UID") == 0xC212
    new = open_node.log_text()[before:]
    assert "1.2\\x00.3\\n2026-01-01" in new, new
    assert not any(line.startswith("2026-01-01") for line in new.splitlines()), new
    assert "\x00" not in new


def test_310_malformed_instances_fail_or_are_stored_as_sent(open_node: RunningNode) -> None:
    """The corpus (built from real series, seed 19): each instance is answered with a failure
    status CONFORMANCE.md lists, or Success with its bytes stored exactly; the node answers
    C-ECHO between batches and its listeners' memory stays bounded."""
    paths = [*series_files(TRIO, 8), *series_files(FORREST, 3)]
    items = list(corpus(paths, SEED))
    assert len(items) >= 300
    assert sum(len(i.data) for i in items) > 2 * RSS_BOUND_KIB * 1024
    documented = _failure_statuses()
    assert {0xC210, 0xC212, 0xA900} <= documented
    baseline = listeners_rss_kib(open_node)
    peak = dict(baseline)
    before = len(open_node.log_text())
    outcomes: collections.Counter[tuple[str, int]] = collections.Counter()
    scu = RawStoreSCU(open_node, (MR_IMAGE,))
    try:
        for number, item in enumerate(items, 1):
            status = scu.store(item.data, sop_class=item.sop_class,
                               sop_instance=item.sop_instance, syntax=item.syntax)
            outcomes[(item.kind, status)] += 1
            where = f"#{number} {item.kind} ({item.detail})"
            if status == 0:
                assert stored_bytes(open_node, item.sop_instance) == item.data, where
            else:
                assert status in documented, f"{where}: status 0x{status:04X}"
            if item.kind == "mismatched class":
                expected = 0xC212 if item.sop_class == "../x" else 0xA900
                assert status == expected, where
            if item.kind in ("bad VR", "hostile UID", "truncation"):
                assert status != 0, where
            if number % 100 == 0:
                assert echoscu(open_node.port).returncode == 0, f"no C-ECHO after {where}"
                for pid, kib in listeners_rss_kib(open_node).items():
                    peak[pid] = max(peak[pid], kib)
    finally:
        scu.release()
    assert echoscu(open_node.port).returncode == 0
    for pid, kib in listeners_rss_kib(open_node).items():
        peak[pid] = max(peak[pid], kib)
    growth = {pid: peak[pid] - baseline[pid] for pid in baseline}
    assert all(kib < RSS_BOUND_KIB for kib in growth.values()), growth
    log = open_node.log_text()[before:]
    assert "Traceback" not in log and "unexpected error" not in log
    assert set(MISMATCHED_CLASSES) >= {i.sop_class for i in items if i.kind == "mismatched class"}
    stored = sum(n for (_, status), n in outcomes.items() if status == 0)
    assert 0 < stored < len(items), outcomes  # both paths were taken

