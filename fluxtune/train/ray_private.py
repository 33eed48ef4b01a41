"""The one place fluxtune relies on Ray beyond its public API, fenced here.
`tests/test_upstream_fences.py` fails when Ray makes it unnecessary.

Token auth for a local cluster started with `ray start` (see `fluxtune.train.local_ray`). `ray.init()` turns token
auth on for a new local cluster and creates a token; fluxtune starts its cluster with `ray start` in a keeper
process instead (so it dies with the driver), and the driver then joins it by address. Both must run in token
mode. Ray's documented switch is the `RAY_AUTH_MODE` environment variable, but a process reads it once, when it
imports ray: the driver has usually imported ray already (Tune, Train), so setting the variable then changes
nothing in the driver and it is refused by its own cluster. Ray's private
`enable_token_auth_by_default` sets the variable and refreshes the process's cached config, which is what
`ray.init()` itself calls; `ensure_token_if_auth_enabled` creates the token file (`ray get-auth-token --generate`
does the same from the command line) and refreshes the process's cached token.
When Ray re-reads `RAY_AUTH_MODE` at `ray.init`, or offers a public call for this, use that instead.

The end of a Tune trial that runs a Train run (`wait_for_the_last_report`): Train hands reports to the trial's
actor through a one-slot queue that the actor drains only when the driver asks for its next result. If the trial
function returned first, Tune would queue its end-of-trial marker ahead of that report, and the actor would block
for good putting the report behind it (the trial hangs: short last stages and a busy driver make this likely).
Ray has no public way to wait for that queue; the session's private queues are read here. When a Tune function
trainable that runs a Train run ends only after its reports are taken, drop it.

A trial's Train run without Ray Data (`torch_trainer`): Ray Train's `DatasetsCallback` starts a DatasetManager
actor for every worker group, datasets or none, one more process (≈ 1.3 CPU-s) per trial that fluxtune never uses
(its workers stream the latent cache themselves). A trainer without datasets leaves that callback out of the
default callbacks it builds (private `_create_default_callbacks`); the workers' dataset provider is optional and
stays unset. When Ray starts no DatasetManager for a run without datasets, use `TorchTrainer` directly.

A restored sweep's callbacks (`restore_tuner`): `Tuner.restore` unpickles the run config of the process that
started the sweep, whose callbacks hold that process's MLflow tracker and console; it takes no new callbacks or stop
condition, so they are set on the restored run config. When `Tuner.restore` accepts `callbacks=`/`stop=` (or a
`run_config=`), pass them there.
"""

from __future__ import annotations

import functools


def enable_token_auth() -> None:
    """Token auth on in this process and the processes it starts, unless the user chose a mode (RAY_AUTH_MODE);
    a token created where Ray looks for one when there is none."""
    from ray._private.authentication.authentication_token_setup import (enable_token_auth_by_default,
                                                                        ensure_token_if_auth_enabled)

    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


def wait_for_the_last_report(timeout_s: float = 600.0) -> None:
    """Return only once Tune has taken every report this trial's Train run handed over (see the module docs)."""
    import time

    from ray.train._internal.session import get_session

    session = get_session()
    reports = getattr(session, "_inter_actor_queue", None) if session else None
    if reports is None:
        return
    deadline, quiet = time.monotonic() + timeout_s, 0
    try:
        while quiet < 3 and time.monotonic() < deadline:  # repeatedly: a report being handed over is in neither
            quiet = quiet + 1 if reports.empty() and session.result_queue.empty() else 0
            time.sleep(0.2)
    except Exception:  # the queue's actor is gone: Tune already ended this trial (stopped early)
        return


def restore_tuner(tune_dir: str, trainable: object, callbacks: list, stop: object):
    """`Tuner.restore` of an interrupted sweep (unfinished and errored trials resume) with this process's
    callbacks and stop condition instead of the pickled ones (see the module docs)."""
    from ray import tune

    tuner = tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True)
    run_config = tuner._local_tuner.get_run_config()
    run_config.callbacks = callbacks
    run_config.stop = stop
    return tuner


def torch_trainer(*args, **kwargs):
    """`ray.train.torch.TorchTrainer(*args, **kwargs)`; without `datasets` its runs start no DatasetManager actor."""
    return _trainer_without_unused_datasets()(*args, **kwargs)


@functools.cache
def _trainer_without_unused_datasets() -> type:
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class TrainerWithoutUnusedDatasets(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]

    return TrainerWithoutUnusedDatasets
