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
"""

from __future__ import annotations


def enable_token_auth() -> None:
    """Token auth on in this process and the processes it starts, unless the user chose a mode (RAY_AUTH_MODE);
    a token created where Ray looks for one when there is none."""
    from ray._private.authentication.authentication_token_setup import (enable_token_auth_by_default,
                                                                        ensure_token_if_auth_enabled)

    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
