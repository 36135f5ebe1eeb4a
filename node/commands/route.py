"""``vaenode route PATH...``: what the routing rules do with series on disk, without scoring.

A PACS admin writing ``[[routing.rules]]`` wants to know, before the scanners send anything,
which of a department's series the node will score and which it will skip, and why. This reads
only the headers (fast, no model) and applies the configured rules exactly as the worker does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from node.commands.common import ConfigOption, setup


def _ms(value: float | None) -> str:
    return f"{value:g} ms" if value is not None else "-"


def route_command(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched "
                                                     "recursively), grouped by series.")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per series.")] = False,
) -> None:
    """Show, per series, its routing attributes and the rule that takes it or why none does."""
    settings = setup(config)
    from node.worker.assemble import find_series, read_headers, series_attributes
    from node.worker.routing import route, validate_rules

    validate_rules(settings)
    found, unused = find_series(paths)
    for path in unused:
        typer.echo(f"vaenode route: not DICOM, ignored: {path}", err=True)
    rules = list(settings.routing.rules)
    for group in found:
        attrs = series_attributes(read_headers(group.paths))
        decision = route(attrs, rules, settings.model)
        acq = attrs.acquisition
        record: dict[str, Any] = {
            "series_instance_uid": attrs.series_instance_uid,
            "instances": len(group.paths),
            "modality": attrs.modality,
            "station_name": attrs.station_name,
            "body_part": attrs.body_part,
            "series_description": attrs.series_description,
            "image_type": list(attrs.image_type),
            "echo_time_ms": acq.echo_time_ms,
            "repetition_time_ms": acq.repetition_time_ms,
            "acquisition_contrast": acq.contrast,
            "angio_flag": acq.angio,
            "rule": decision.rule.name if decision.rule else None,
            "model": (str(decision.bundle) if decision.bundle else "default")
            if decision.rule else None,
            "skipped_because": decision.reason,
        }
        if as_json:
            typer.echo(json.dumps(record))
            continue
        typer.echo(
            f"Series {attrs.series_instance_uid} ({len(group.paths)} instances): "
            f"{attrs.modality or '?'} {attrs.series_description or ''}".rstrip()
        )
        typer.echo(
            f"  station {attrs.station_name or '-'}, body part {attrs.body_part or '-'}, "
            f"image type {chr(92).join(attrs.image_type) or '-'}, "
            f"echo time {_ms(acq.echo_time_ms)}, "
            f"repetition time {_ms(acq.repetition_time_ms)}, contrast {acq.contrast or '-'}, "
            f"angio flag {'-' if acq.angio is None else 'Y' if acq.angio else 'N'}"
        )
        if decision.rule is not None:
            typer.echo(f"  scored: rule {decision.rule.name}, model {record['model']}, "
                       f"flagged from {decision.rule.min_abnormal_slices} abnormal slice(s)")
        else:
            typer.echo(f"  skipped: {decision.reason}")


def register(app: typer.Typer) -> None:
    """Add ``route`` to the ``vaenode`` command."""
    app.command("route")(route_command)
