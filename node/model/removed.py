"""Bundle settings whose code was removed, and what loading does when ``model.json`` names one.

Three opt-in parts of the score were measured, not shipped and then removed (project rule:
each part of the score must earn its place on today's measurements): the detail part
(``scoring.detail``), the detail step part (``scoring.detail_step``) and slab averaging of
thin slices (``preprocessing.slab_mm``). ``node/models/README.md`` ("Removed parts") keeps
their measurements; commit ``LAST_VERSION`` has the last version of their code.

A bundle written before the removal may still carry such a key. Where its value is the one
that turned the part off (absent, null, or 0 for the slab), the key is dropped and the bundle
scores exactly as it did. Any other value means the bundle's scores and threshold depend on
the removed part, and loading refuses it rather than score it differently.
"""

from __future__ import annotations

from typing import Any

from node.errors import ModelError

#: A commit with the last version of the removed parts' code (none of it changed after it).
LAST_VERSION = "61ced1f"

#: (``model.json`` section, key) -> (the part's name, the values that turned it off).
REMOVED: dict[tuple[str, str], tuple[str, tuple[Any, ...]]] = {
    ("scoring", "detail"): ("the detail part", (None,)),
    ("scoring", "detail_step"): ("the detail step part", (None,)),
    ("preprocessing", "slab_mm"): ("slab averaging of thin slices", (None, 0)),
}


def drop_removed(section: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (the ``section`` entry of ``model.json``) without its removed keys.

    Raises:
        ModelError: a removed key holds a value that turned its part on; the message names
            the key and the part.
    """
    out = dict(data)
    for (where, key), (part, neutral) in REMOVED.items():
        if where != section or key not in out:
            continue
        value = out.pop(key)
        if not any(value is v or (type(value) in (int, float) and value == v) for v in neutral):
            raise ModelError(
                f"{section}.{key} = {value!r}: the bundle uses {part}, which was removed from "
                f"the node (its last version is at commit {LAST_VERSION}; see "
                f"node/models/README.md, 'Removed parts'); score it with that commit, or delete "
                f"the key and calibrate the bundle again (vaenode calibrate): its threshold was "
                f"set with the part")
    return out
