"""Which trials a sweep may publish, best first: the Optuna study's order, trusted only where the sweep file agrees.

The study is where every run of a sweep (the first, each `--resume`, each `--more`) tells how its trials ended:
COMPLETE with the metric's final value, PRUNED when a scheduler stopped the trial early, FAIL when it diverged or
errored (`fluxtune.search.guard.FiniteOptunaSearch`). Its COMPLETE trials with finite values, in the study's
direction, are the candidates (ties: the earlier trial). Each is joined to its sweep-file row through the Tune
trial id the searcher stored on it, and the row must agree: every planned step ran, no error, a finite metric.
A study that cannot be read publishes nothing (`StudyUnreadable`), never a guess. A sweep without a searched space
has no study (Tune runs the base): its rows are ranked by themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fluxtune.search.space import StudyUnreadable, load_study

TRIAL_ID_ATTR = "fluxtune.trial_id"  # on each Optuna trial: the Tune trial it ran as
PLANNED_STEPS_ATTR = "fluxtune.planned_steps"  # on each Optuna trial: the global steps its config plans


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def publishable(row: dict[str, Any], metric: str) -> bool:
    return not row.get("error") and is_finite(row.get(metric)) and row["steps"] >= row.get("planned_steps", 0)


def ranked(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Publishable rows, best first, by the rows alone (a sweep without a study). Ties: the earlier trial id (Tune's
    variant generator numbers its trials in order), so the order never depends on dict order."""
    good = [r for r in rows if publishable(r, metric)]
    return sorted(good, key=lambda r: (r[metric] if mode == "min" else -r[metric], r["trial"]))


@dataclass(frozen=True)
class StudyTrial:
    number: int  # Optuna's: the order trials were asked for, across every run of the sweep
    trial_id: str | None  # the Tune trial (None: a trial the searcher did not label)
    value: float


def study_order(url: str, study_name: str) -> list[StudyTrial]:
    """The study's COMPLETE trials with finite values, best first for its direction (ties: the earlier trial).
    Raises StudyUnreadable when the study cannot be read."""
    import optuna

    study = load_study(url, study_name)
    try:
        minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as exc:  # a damaged database fails here, not when it is opened
        raise StudyUnreadable(f"the Optuna study {study_name!r} in {url} cannot be read: {exc}") from exc
    done = [StudyTrial(t.number, t.user_attrs.get(TRIAL_ID_ATTR), t.value) for t in trials if is_finite(t.value)]
    return sorted(done, key=lambda t: (t.value if minimize else -t.value, t.number))


class TrialRanking:
    """The order publishing and retention both follow (so retention never prunes what publishing needs)."""

    def __init__(self, metric: str, mode: str, study_url: str | None = None, study_name: str | None = None):
        self.metric, self.mode = metric, mode
        self.study_url, self.study_name = study_url, study_name  # None: the sweep has no study

    def best(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The publishable rows, best first. Raises StudyUnreadable when the study cannot be read."""
        if not (self.study_url and self.study_name):
            return ranked(rows, self.metric, self.mode)
        by_trial = {row["trial"]: row for row in rows}
        order = []
        for trial in study_order(self.study_url, self.study_name):
            row = by_trial.get(trial.trial_id or "")
            if row is not None and publishable(row, self.metric):
                order.append(row)
        return order
