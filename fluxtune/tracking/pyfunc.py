"""The registered model: an `mlflow.pyfunc` model that inpaints with base transformer + adapter.

Input: a DataFrame with `image` and `mask` (file paths or base64 PNGs) and optional `prompt`; params `steps`
and `seed`. Output: a DataFrame with `image`: base64-encoded PNGs. The base transformer is loaded from the
reference the version holds, checked against its content hashes (`fluxtune.version_contents`).
"""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc


def _open(value: Any):
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str) and not _is_file(value):
        return Image.open(io.BytesIO(base64.b64decode(value)))
    return Image.open(value)


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except OSError:  # a base64 PNG is far longer than any file name
        return False


_CHECK = {"active": False}  # a process-wide switch: MLflow may load the model on another thread


@contextlib.contextmanager
def example_check_only():
    """While registering: MLflow loads the model to run its input example through the signature. That check
    is about the input's shape, so the weights (GBs) are not loaded and `predict` answers without inpainting."""
    _CHECK["active"] = True
    try:
        yield
    finally:
        _CHECK["active"] = False


class FluxFillInpainter(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from fluxtune.version_contents import read_meta

        folder = Path(context.artifacts["checkpoint"])
        self.meta = read_meta(folder)
        self.pipeline = None
        if _CHECK["active"]:
            return
        # imported only to inpaint: the registering driver's example check would pay seconds for diffusers
        from fluxtune.flux.inpaint import fill_pipeline
        from fluxtune.version_contents import registered_base
        from fluxtune.worker_setup import load_bundle

        self.bundle = load_bundle(self.meta["model"])
        transformer = registered_base(folder, self.bundle.transformer, verify=True)  # one line if gone/changed
        self.pipeline = fill_pipeline(self.bundle, transformer)
        if (folder / "adapter").is_dir():
            self.pipeline.load_lora_weights(str(folder / "adapter"))
        # After loading: the injected LoRA layers start in training mode (dropout on), whatever the base was.
        self.pipeline.transformer.eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        from PIL import Image

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if self.pipeline is None:  # the input-example check while registering (example_check_only)
            return pd.DataFrame({"image": [""] * len(frame)})
        from fluxtune.flux.inpaint import inpaint

        prompts = list(frame["prompt"]) if "prompt" in frame else None
        images = inpaint(self.bundle, self.pipeline, [_open(v) for v in frame["image"]],
                         [_open(v) for v in frame["mask"]], prompts,
                         steps=int(params.get("steps", 8)), guidance=self.meta["model"].get("guidance", 30.0),
                         seed=int(params.get("seed", 0)))
        encoded = []
        for array in images:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        return pd.DataFrame({"image": encoded})
