"""Sample-image grids on their way from a worker to MLflow: their encoding (the report key they ride under is
`fluxtune.train.protocol.SAMPLES_KEY`).

The grid itself is drawn in the worker (fluxtune.flux.preview); its PNG rides to the driver with the next Tune
report, like the buffered step metrics, and the driver's MLflow callback logs it: no shared filesystem is assumed.
"""

from __future__ import annotations

import base64
import json


def encode_samples(samples: list[bytes | tuple[int | None, bytes]]) -> str:
    """Grids for a report: PNG bytes, or (step, PNG) for a grid of another step than the report's."""
    pairs = [s if isinstance(s, tuple) else (None, s) for s in samples]
    return json.dumps([{"step": step, "png": base64.b64encode(png).decode("ascii")} for step, png in pairs])


def decode_samples(value: str | None) -> list[tuple[int | None, bytes]]:
    """(step or None for the report's own step, PNG bytes) of each grid a report carries."""
    return [(item["step"], base64.b64decode(item["png"])) for item in json.loads(value or "[]")]
