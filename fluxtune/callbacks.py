"""Runtime callback dispatch: the stage events of `base.callbacks` reach each callback, in YAML order.

Built by `run_cycle` once per trial and worker; the stage context calls `step_end` from `ctx.log`, the cycle
calls `stage_start` and `stage_end`. Methods a callback lacks are skipped when the list is built, so an empty
list (the default) costs nothing per step.
"""

from __future__ import annotations

from typing import Any, Iterable


class CallbackList:
    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)
        self._stage_start = [cb.on_stage_start for cb in self.callbacks if hasattr(cb, "on_stage_start")]
        self._step_end = [cb.on_step_end for cb in self.callbacks if hasattr(cb, "on_step_end")]
        self._stage_end = [cb.on_stage_end for cb in self.callbacks if hasattr(cb, "on_stage_end")]

    @classmethod
    def build(cls, specs: Iterable[dict[str, Any]], components: Any) -> "CallbackList":
        """Instantiate `[{type: name, ...params}]` (already validated) from the component table."""
        return cls(components.get("callback", spec["type"]).build(spec) for spec in specs)

    def stage_start(self, ctx: Any) -> None:
        for fn in self._stage_start:
            fn(ctx)

    def step_end(self, ctx: Any, step: int, metrics: dict[str, Any]) -> None:
        for fn in self._step_end:
            fn(ctx, step, metrics)

    def stage_end(self, ctx: Any, metrics: dict[str, float]) -> dict[str, float]:
        """Extra metrics the callbacks return, merged in order (later callbacks win on a shared key)."""
        extra: dict[str, float] = {}
        for fn in self._stage_end:
            extra.update(fn(ctx, dict(metrics)) or {})
        return extra

    def __len__(self) -> int:
        return len(self.callbacks)
