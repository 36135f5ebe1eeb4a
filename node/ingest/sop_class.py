"""Is the SOP class of a C-STORE one the node stores, and the data set's own?

The node accepts a presentation context for every storage SOP class, private class or public
class it does not know (pynetdicom's unrestricted storage service, CONFORMANCE.md 2.1), and
stores each instance with a file meta built from the request (Media Storage SOP Class UID =
the request's Affected SOP Class UID). Nothing compared that class with anything: a request
naming ``../x``, the Verification SOP class or CT Image Storage over an MR data set got Success,
and the stored file then claimed one class in its meta and another in its data set.

:func:`check_sop_class` refuses such an instance before anything is written: a class that is
not UID syntax (0xC212, as every UID), one that differs from the data set's SOP Class UID
(0008,0016), or one that is a SOP class of another service (Verification, Query/Retrieve,
worklist, print...) or another kind of UID the DICOM dictionary names (a transfer syntax, an
application context): 0xA900 "Data Set does not match SOP Class".
"""

from __future__ import annotations

from pydicom.uid import UID
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.errors import SopClassMismatch
from node.ingest.parse import ParsedInstance, check_uid


def is_storage_class(uid: str) -> bool:
    """True for a SOP class the node accepts C-STORE for: a storage SOP class, a private UID,
    a retired SOP class pynetdicom has no service for (Annex B's retired storage classes), or
    a DICOM UID no dictionary names (a class newer than them)."""
    value = UID(uid)
    service = uid_to_service_class(value)
    if service is StorageServiceClass or value.is_private:
        return True
    if service is not ServiceClass:  # a SOP class of another service
        return False
    return value.type in ("", "SOP Class")  # not a transfer syntax, context name...


def check_sop_class(parsed: ParsedInstance) -> None:
    """Refuse an instance whose request names a class the node does not store it as.

    Raises:
        InvalidUID: the request's SOP Class UID is not UID syntax.
        SopClassMismatch: it differs from the data set's SOP Class UID, or is not a storage
            SOP class (:func:`is_storage_class`).
    """
    requested = parsed.meta_sop_class_uid
    if requested is None:
        raise SopClassMismatch("the request names no SOP class")
    check_uid(requested, "Affected SOP Class UID")
    if requested != parsed.sop_class_uid:
        raise SopClassMismatch(f"the request's SOP class {requested} is not the data set's "
                               f"{parsed.sop_class_uid}")
    if not is_storage_class(requested):
        raise SopClassMismatch(f"{requested} ({UID(requested).name}) is not a storage SOP class")
