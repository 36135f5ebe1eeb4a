"""``vaenode db`` and ``vaenode queue`` on a real temp database, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select, update

from node.config import DatabaseSettings
from node.queue import repo
from node.queue.db import make_engine, make_session_factory
from node.queue.models import Instance, Series, utcnow
from tests.helpers.records import mr_instance

VAENODE = Path(sys.executable).with_name("vaenode")


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VAENODE), *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=120, cwd=config.parent)


def test_db_upgrade_then_queue_list_and_show(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    done = _run(config, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    assert "database at revision" in done.stdout

    engine = make_engine(DatabaseSettings(url=url))
    factory = make_session_factory(engine)
    for i, uid in enumerate(("1.2.826.1", "1.2.826.2")):
        with factory.begin() as s:
            repo.record_instance(s, mr_instance(
                "1.2.826", uid, utcnow() - timedelta(seconds=100 * (1 - i))))
    with factory.begin() as s:
        first = repo.idle_series_ids(s, utcnow() - timedelta(seconds=50))
        repo.mark_queued(s, first[0], idle_before=utcnow())
    engine.dispose()

    listed = _run(config, "queue", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["series_instance_uid"], r["status"]) for r in rows] == [
        ("1.2.826.2", "receiving"), ("1.2.826.1", "queued")]
    queued = _run(config, "queue", "list", "--status", "queued", "--json")
    assert [json.loads(x)["series_instance_uid"] for x in queued.stdout.splitlines()] == [
        "1.2.826.1"]
    table = _run(config, "queue", "list")
    assert "1.2.826.1" in table.stdout and "queued" in table.stdout
    bad = _run(config, "queue", "list", "--status", "nonsense")
    assert bad.returncode != 0

    shown = _run(config, "queue", "show", "1.2.826.1", "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["instance_count"] == 1 and detail["calling_aet"] == "MR1"
    assert [(e["from"], e["to"]) for e in detail["events"]] == [
        (None, "receiving"), ("receiving", "queued")]
    assert detail["instances"][0]["path"] == "a/1.2.826.1/1.dcm"
    missing = _run(config, "queue", "show", "9.9.9")
    assert missing.returncode == 1 and "no series" in missing.stderr


def test_queue_purge_lists_then_deletes_and_retry_is_refused(tmp_path: Path) -> None:
    """An admin frees space now: --dry-run lists the finished series old enough, the real run
    deletes their files, and a re-score of such a series is refused with the reason."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    storage = tmp_path / "storage"
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{url}"\n[storage]\ndir = "{storage}"\n'
                      "retention_days = 0\n", encoding="utf-8")
    assert _run(config, "db", "upgrade").returncode == 0
    factory = make_session_factory(make_engine(DatabaseSettings(url=url)))
    old = utcnow() - timedelta(days=3)
    for uid in ("1.2.827.1", "1.2.827.2"):
        rel = f"1.2.827/{uid}/1.dcm"
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        (storage / rel).write_bytes(b"x")
        with factory.begin() as s:
            repo.record_instance(s, mr_instance(
                "1.2.827", uid, old, path=rel, size_bytes=1, series_description=None,
                body_part=None, calling_aet=None, peer_address=None))
    with factory.begin() as s:  # the first is done (3 days ago), the second still receiving
        s.execute(update(Series).where(Series.series_instance_uid == "1.2.827.1")
                  .values(status="done", updated_at=old))

    off = _run(config, "queue", "purge")
    assert off.returncode == 1 and "retention is off" in off.stderr
    listed = _run(config, "queue", "purge", "--older-than-days", "2", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert "1.2.827.1" in listed.stdout and "1.2.827.2" not in listed.stdout
    assert "1 series would lose their images" in listed.stdout
    assert (storage / "1.2.827/1.2.827.1/1.dcm").exists()
    assert "0 series" in _run(config, "queue", "purge", "--older-than-days", "5").stdout
    done = _run(config, "queue", "purge", "--older-than-days", "2")
    assert done.returncode == 0 and "images of 1 series deleted" in done.stdout
    assert not (storage / "1.2.827/1.2.827.1").exists()
    assert (storage / "1.2.827/1.2.827.2/1.dcm").exists()
    shown = json.loads(_run(config, "queue", "show", "1.2.827.1", "--json").stdout)
    assert shown["images_deleted_at"] is not None and shown["instances"] == []
    assert shown["alerts"] == []
    text = _run(config, "queue", "show", "1.2.827.1")
    assert text.returncode == 0 and "images_deleted_at" in text.stdout, text.stderr
    retry = _run(config, "queue", "retry", "1.2.827.1")
    assert retry.returncode == 1 and "retention policy" in retry.stderr


def test_retry_every_series_skipped_since_a_rule_change(tmp_path: Path) -> None:
    """After widening a routing rule the admin queues again what it skipped since then; a
    series older than that, one whose images are gone and one done are left as they are."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    assert _run(config, "db", "upgrade").returncode == 0
    engine = make_engine(DatabaseSettings(url=url))
    factory = make_session_factory(engine)
    now = utcnow()
    states = {"1.2.828.1": ("skipped", now - timedelta(hours=1)),
              "1.2.828.2": ("skipped", now - timedelta(days=3)),
              "1.2.828.3": ("skipped", now - timedelta(hours=2)),  # images deleted
              "1.2.828.4": ("done", now - timedelta(hours=1))}
    for uid, (status, when) in states.items():
        with factory.begin() as s:
            repo.record_instance(s, mr_instance(
                "1.2.828", uid, when, path=f"x/{uid}/1.dcm", size_bytes=1,
                series_description=None, body_part=None, calling_aet=None, peer_address=None))
            s.execute(update(Series).where(Series.series_instance_uid == uid)
                      .values(status=status, updated_at=when))
    with factory.begin() as s:
        s.execute(delete(Instance).where(Instance.sop_instance_uid == "1.2.828.3.1"))
    since = (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    out = _run(config, "queue", "retry", "--skipped-since", since)
    assert out.returncode == 0, out.stderr
    assert "series 1.2.828.1 queued to be scored again" in out.stdout
    assert "1 skipped series since" in out.stdout and "1 refused" in out.stdout
    assert "not queued: 1.2.828.3" in out.stderr and "no stored images" in out.stderr
    with factory() as s:
        status = dict(s.execute(select(Series.series_instance_uid, Series.status)).all())
    engine.dispose()
    assert {uid: st.value for uid, st in status.items()} == {
        "1.2.828.1": "queued", "1.2.828.2": "skipped", "1.2.828.3": "skipped",
        "1.2.828.4": "done"}
    both = _run(config, "queue", "retry", "1.2.828.2", "--skipped-since", since)
    assert both.returncode == 2 and "not both or neither" in both.stderr
    bad = _run(config, "queue", "retry", "--skipped-since", "last week")
    assert bad.returncode == 2 and "not a date or time" in bad.stderr
