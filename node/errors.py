"""The exception tree of the node.

Each error that can reach a DICOM peer carries its wire meaning (PS3.4 Annex B / PS3.7 Annex C)
so that the SCP translates exceptions into status codes in exactly one place.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration cannot be used; start-up stops with this message."""


class IngestError(NodeError):
    """An instance could not be accepted; ``status`` is the C-STORE status to answer with."""

    status: int = 0xC211


class InvalidUID(IngestError):
    """A UID that is not DICOM UID syntax (PS3.5 9.1) or is longer than 64 characters."""

    # PS3.4 B.2.3: Cxxx "Cannot understand"; 0xC212 is used by pynetdicom for invalid UIDs.
    status = 0xC212


class Undecodable(IngestError):
    """The received bytes are not a dataset we can read (truncated, garbage)."""

    status = 0xC210


class MissingAttribute(IngestError):
    """A required attribute (Study/Series/SOP Instance UID) is absent."""

    status = 0xC213


class SopClassMismatch(IngestError):
    """The request's SOP class is not the data set's, or is not a storage SOP class: "Error:
    Data Set does not match SOP Class" (PS3.4 B.2.3)."""

    status = 0xA900


class DiskFull(IngestError):
    """Free space is below the configured minimum: "Refused: Out of Resources" (PS3.4 B.2.3)."""

    status = 0xA700


class StorageFailure(IngestError):
    """Writing the file or committing the row failed for a reason not caused by the peer."""

    status = 0xC211


class ModelError(NodeError):
    """A model bundle is missing, broken or does not match the code that loads it."""


class AssemblyError(NodeError):
    """The instances of a series cannot be assembled into image stacks; the message says why."""


class NoImages(AssemblyError):
    """The series holds no image to score (only reports, key objects, presentation states...);
    the worker marks it ``skipped`` rather than ``failed``."""


class DeliveryError(NodeError):
    """A report could not be delivered to a destination."""


class ReportError(NodeError):
    """A report cannot be built from a verdict and its sources (missing or foreign instances)."""


class QueueConflict(NodeError):
    """A queue transition's precondition no longer holds (the series moved on meanwhile).

    Raised inside the caller's transaction so that whatever it wrote with the transition (for
    example a worker's slice results) is rolled back with it.
    """


class AdminActionError(NodeError):
    """A dashboard action that does not apply to the series as it stands (e.g. a false alarm
    on a series that was not flagged); the dashboard answers 409 with this message."""


class BackupError(NodeError):
    """A copy of the queue database could not be made; nothing is left at the destination."""
