"""End to end: bad rows skipped, an explicit validation file and 2 Ray Train workers on this 2-core machine (the
reference sweep, tests/reference.py). The driver builds the latent cache once; the skipped count lands on the
MLflow sweep run."""

from __future__ import annotations

import json

import pytest

from reference import TRAIN_ROWS, VAL_ROWS

pytestmark = pytest.mark.e2e


def test_two_workers_train_from_the_cache_built_once_by_the_driver(reference_sweep):
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    out = " ".join(reference_sweep.result.stdout.split())
    assert f"{TRAIN_ROWS + VAL_ROWS} rows, 1 bad rows skipped; latent cache" in out and "(built in" in out
    caches = [p for p in (reference_sweep.root / "cache" / "latents").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert (manifest["rows"], manifest["val_file_rows"]) == (TRAIN_ROWS + VAL_ROWS, VAL_ROWS)


def test_the_skipped_row_count_is_a_param_of_the_sweep_run(reference_sweep):
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    [sweep] = reference_sweep.runs("sweep")
    assert sweep.data.params["data.skipped_rows"] == "1"
    assert sweep.data.params["data.rows"] == str(TRAIN_ROWS + VAL_ROWS)
    for trial in reference_sweep.runs("trial"):
        assert trial.info.status == "FINISHED"
        assert "val_loss" in trial.data.metrics
