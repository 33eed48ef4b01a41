"""Which latent caches a sweep needs: one per distinct preprocessing its trials can ask for, all built by the
driver before the first trial.

`data.resolution`, `data.mask_threshold`, `data.buckets` and `data.cache_dtype` decide how images become stored
latents, so a search over them is supported for categorical choices (one cache per combination, at most
MAX_CACHES). A range over them,
or a search over the preset keys its VAE and text encoders come from, is refused before Ray starts. A searched
`model.path` reads the base model's cache: the choices must share its VAE and text encoders (fine-tunes of
FLUX.1-Fill-dev do).
Import-light (no torch, no ray): preflight uses it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

PREPROCESSING_KEYS = ("data.resolution", "data.mask_threshold", "data.buckets", "data.cache_dtype")
ENCODER_KEYS = ("model.preset", "model.seed")
MAX_CACHES = 8  # each one encodes the whole dataset again


def searched_cache_problems(space: dict[str, Any]) -> list[tuple[str, str]]:
    """(search key, message) for every searched key the latent cache cannot follow."""
    problems = []
    for key, dist in space.items():
        if key in ENCODER_KEYS:
            problems.append((key, "the latent cache is encoded once per sweep with one VAE and text encoders: "
                                  f"{key} cannot be searched (run one sweep per preset and seed)"))
        elif key in PREPROCESSING_KEYS and dist.type != "categorical":
            problems.append((key, f"{key} decides how the latent cache is built (one cache per value, before any "
                                  "trial): search it with {type: categorical, choices: [...]}"))
    counts = [len(space[k].choices) for k in PREPROCESSING_KEYS if k in space and space[k].type == "categorical"]
    if math.prod(counts) > MAX_CACHES:
        key = next(k for k in PREPROCESSING_KEYS if k in space)
        problems.append((key, f"the searched data keys need {math.prod(counts)} latent caches (one per "
                              f"combination); at most {MAX_CACHES}"))
    return problems


def data_variants(data: dict[str, Any], space: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The base `data` config once per combination of the searched preprocessing choices (the base alone when
    none is searched). With conditions (`when`) a trial may keep a base value, so the base is built too."""
    keys = [k for k in PREPROCESSING_KEYS if space and k in space]
    variants = [data] if any(space[k].when for k in keys) else []
    for combination in itertools.product(*(space[k].choices for k in keys)) if keys else [()]:
        variant = {**data, **{k.split(".", 1)[1]: value for k, value in zip(keys, combination)}}
        if variant not in variants:
            variants.append(variant)
    return variants
