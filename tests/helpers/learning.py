"""Station references for tests: learning series written straight into a migrated database
(rows as the worker stores them), so that the learning can be tested without a model."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import MRImageStorage, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from node.queue.models import Instance, Series, SliceScore, utcnow
from node.queue.references import LEARNING, StationKey
from node.queue.states import SeriesState

KEY = StationKey(station="MR ROOM 3", station_source="station_name", scanner_model="Prisma",
                 protocol="t1 mprage sag", model_name="brain-t1", model_version="0.1.0")


def add_learning_series(session_factory: sessionmaker[Session], reference_id: int,
                        scores: Sequence[float], **kwargs: Any) -> int:
    """:func:`write_learning_series` in a transaction of its own; the series id."""
    with session_factory.begin() as session:
        return write_learning_series(session, reference_id, scores, **kwargs)


def write_learning_series(session: Session, reference_id: int, scores: Sequence[float], *,
                          background: int = 3, abnormal: bool = False, state: str = LEARNING,
                          status: SeriesState = SeriesState.DONE,
                          storage: Path | None = None,
                          station_scores: Sequence[float] | None = None) -> int:
    """A scored series judged by ``reference_id`` (in the caller's transaction): ``scores`` on
    its foreground slices, a few background slices before them with meaningless scores; its
    id. With ``storage``, one instance file per slice is recorded (empty files) under
    ``<storage>/<study>/<series>/``. With ``station_scores``, the slices also carry a station
    score (a bundle that declares one)."""
    now = utcnow()
    study, uid = generate_uid(), generate_uid()
    series = Series(study_instance_uid=study, series_instance_uid=uid, modality="MR",
                    series_description="T1 MPRAGE sag", calling_aet="MR3",
                    station_name=KEY.station, scanner_model=KEY.scanner_model,
                    instance_count=len(scores) + background,
                    first_received_at=now - timedelta(minutes=1), last_received_at=now,
                    status=status, attempts=1, updated_at=now, abnormal=abnormal,
                    abnormal_slices=0, scored_slices=len(scores) + background,
                    min_abnormal_slices=3, model_name=KEY.model_name,
                    model_version=KEY.model_version, threshold=-36000.0, scored_at=now,
                    reference_id=reference_id, reference_state=state)
    session.add(series)
    session.flush()
    values = [-1e9] * background + [float(s) for s in scores]
    station = (None if station_scores is None
               else [-1e9] * background + [float(s) for s in station_scores])
    for k, value in enumerate(values):
        sop = generate_uid()
        session.add(SliceScore(series_id=series.id, sop_instance_uid=sop,
                               sop_class_uid=MRImageStorage, frame=None, stack=0,
                               slice_index=k, log_likelihood=value, kl=1.0, elbo=value,
                               abnormal=False, confidence=0.5,
                               foreground=k >= background, bundle_score=value,
                               station_score=None if station is None else station[k]))
        if storage is not None:
            rel = Path(study) / uid / f"{sop}.dcm"
            (storage / rel).parent.mkdir(parents=True, exist_ok=True)
            (storage / rel).touch()
            session.add(Instance(series_id=series.id, sop_instance_uid=sop,
                                 sop_class_uid=MRImageStorage, transfer_syntax_uid="1.2",
                                 path=str(rel), size_bytes=0, instance_number=k + 1,
                                 received_at=now))
    session.flush()
    return int(series.id)


def site_scores(n: int, seed: int, centre: float = -5000.0) -> list[np.ndarray]:
    """Foreground slice scores of n normal series of one simulated station."""
    rng = np.random.default_rng(seed)
    return [centre + rng.normal(0.0, 400.0) + 1500.0 * rng.standard_t(8, 60) for _ in range(n)]
