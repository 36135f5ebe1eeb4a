"""``vaenode route`` run as a real process on the real series: the rules' decisions, explained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.commands.test_score import records, vaenode
from tests.helpers.series import DICOM

SERIES = ("siemens_trio_gre_field_mapping_2", "siemens_trio_gre_field_mapping_3",
          "tcia_prostate_t2_0002")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not all((DICOM / name).is_dir() for name in SERIES):
        pytest.skip("shared data not found")
    out = tmp_path_factory.mktemp("route")
    for name in SERIES:
        shutil.copytree(DICOM / name, out / name)
    (out / "notes.txt").write_text("not an image")
    return out


def test_default_rules_json(folder: Path, tmp_path: Path) -> None:
    proc = vaenode("route", folder, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not DICOM, ignored" in proc.stderr and "notes.txt" in proc.stderr
    by_description = {(r["series_description"], tuple(r["image_type"])[2]): r
                      for r in records(proc.stdout)}
    magnitude = by_description[("gre_field_mapping", "M")]
    assert magnitude["rule"] == "brain-t1-mr" and magnitude["model"] == "default"
    assert magnitude["echo_time_ms"] == 7.38 and magnitude["repetition_time_ms"] == 488.0
    assert magnitude["instances"] == 36 and magnitude["skipped_because"] is None
    assert magnitude["station_name"] == "MRC35389"  # what a station_name rule would match
    phase = by_description[("gre_field_mapping", "P")]
    assert phase["rule"] is None and "phase image" in phase["skipped_because"]
    prostate = by_description[("T2 TSE ax hi", "M_SE")]
    assert prostate["rule"] is None and prostate["body_part"] == "PROSTATE"
    assert prostate["skipped_because"] == (
        "no routing rule matches (brain-t1-mr: body part PROSTATE is not one of HEAD, BRAIN, SKULL)"
    )


def test_configured_rules_and_text_output(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[[routing.rules]]\nname = "prostate-t2"\nmodality = "MR"\nbody_part = "prostate"\n'
        'echo_time_ms = [80, 150]\nmodel = "/models/prostate"\nmin_abnormal_slices = 2\n\n'
        '[[routing.rules]]\nname = "short-te"\nmodality = "MR"\necho_time_ms = [0, 5]\n'
    )
    proc = vaenode("route", folder / "tcia_prostate_t2_0002",
                   folder / "siemens_trio_gre_field_mapping_2", "--config", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "MR T2 TSE ax hi" in text and "body part PROSTATE" in text
    assert "scored: rule prostate-t2, model /models/prostate, flagged from 2" in text
    assert ("skipped: no routing rule matches (prostate-t2: echo time 7.38 ms is outside "
            "80-150 ms; short-te: echo time 7.38 ms is outside 0-5 ms)") in text


def test_bad_rule_is_a_configuration_error(folder: Path, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[[routing.rules]]\nname = "x"\nexclude_series_description = "(tof"\n')
    proc = vaenode("route", folder, "--config", config, cwd=tmp_path)
    assert proc.returncode == 2 and "bad series description pattern" in proc.stderr
    config.write_text('[[routing.rules]]\nname = "x"\necho_time_ms = [30, 10]\n')
    proc = vaenode("route", folder, "--config", config, cwd=tmp_path)
    assert proc.returncode == 2 and "echo_time_ms" in proc.stderr
