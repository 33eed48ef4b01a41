"""What a trial is called where people see it (MLflow run names, the console, the summary table): its sampled
values, e.g. `r16-a96-lr2.1e-3-c2`, instead of Tune's `trial-<hex>`.

Import-light (no optuna, no ray): the CLI's summary uses it too.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

# Short labels of the keys searches use most; any other key is named by its last path component.
SHORT = {"rank": "r", "alpha": "a", "lr": "lr", "cycles": "c", "dropout": "do", "steps": "s", "weight_decay": "wd",
         "batch_size": "bs", "resolution": "px", "workers": "w", "seed": "seed", "type": ""}


def column_labels(paths: Iterable[str]) -> dict[str, str]:
    """Dotted search path → a short readable column name: `stages.lora.adapter.rank` → `rank`; when two paths end
    alike (`stages.full.optimizer.lr`, `stages.lora.optimizer.lr`) their stage is named: `full lr`, `lora lr`."""
    paths = list(paths)
    last = [p.rsplit(".", 1)[-1] for p in paths]
    out = {}
    for path, name in zip(paths, last):
        parts = path.split(".")
        clash = last.count(name) > 1 and len(parts) > 2 and parts[0] == "stages"
        out[path] = f"{parts[1]} {name}" if clash else name
    return out


def format_value(value: Any) -> str:
    """Compact: 0.0021 → 2.1e-3, 96.0 → 96, 0.05 → 0.05, True → on."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value).replace(".0", "")
        if value.is_integer() and abs(value) < 1e5:
            return str(int(value))
        if 0.01 <= abs(value) < 1e4:
            return f"{value:.2g}"
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.replace('.0', '')}e{int(exponent)}"
    return str(value)


def trial_name(config: dict[str, Any]) -> str:
    """The sampled values of a trial, in search-file order: `r16-a96-lr2.1e-3-c2`."""
    labels = column_labels(config)
    parts = []
    for path, value in config.items():
        label = labels[path]
        short = SHORT.get(label, label.replace(" ", "_"))
        if " " in label:  # a stage-qualified key: lora_lr2e-3
            stage, key = label.split(" ", 1)
            short = f"{stage}_{SHORT.get(key, key)}"
        parts.append(f"{short}{format_value(value)}")
    return "-".join(parts) or "run"


def unique_names(configs: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """(trial id, sampled config) in the order the trials started → trial id: a name unique within the sweep (a
    repeated configuration gets `-2`, `-3`, … in start order)."""
    seen: dict[str, int] = {}
    out = {}
    for trial_id, config in configs:
        name = trial_name(config)
        seen[name] = seen.get(name, 0) + 1
        out[trial_id] = name if seen[name] == 1 else f"{name}-{seen[name]}"
    return out
