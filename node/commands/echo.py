"""``vaenode echo AE@HOST:PORT``: C-ECHO a peer, e.g. to check a PACS destination."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from node.commands.common import ConfigOption, setup
from node.errors import ConfigError, DeliveryError

_TARGET_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def parse_target(target: str) -> tuple[str, str, int]:
    """Split ``AE@HOST:PORT`` (IPv6 hosts in brackets).

    Raises:
        ConfigError: the target is not of that form.
    """
    match = _TARGET_RE.match(target)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"{target!r} is not AE@HOST:PORT")
    return match["aet"], match["host"].strip("[]"), int(match["port"])


def echo(
    target: Annotated[str, typer.Argument(help="The peer, as AE@HOST:PORT.")],
    config: ConfigOption = None,
    calling_aet: Annotated[
        str | None, typer.Option(help="Our AE title (default: [dicom].ae_title).")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="Network and DIMSE timeout, seconds.")] = 10.0,
) -> None:
    """Send a C-ECHO and report the answer; exit 1 when the peer does not answer Success."""
    settings = setup(config)
    aet, host, port = parse_target(target)
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_aet or settings.dicom.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DeliveryError(f"association with {target} failed: {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        shown = f"0x{code:04X}" if code is not None else "no response"
        raise DeliveryError(f"C-ECHO to {target}: {shown}")
    typer.echo(f"C-ECHO {target}: Success")


def register(app: typer.Typer) -> None:
    """Add ``echo`` to the ``vaenode`` command."""
    app.command("echo")(echo)
