"""The registered model: an `mlflow.pyfunc` model that inpaints with base transformer + adapter.

Input: a DataFrame with `image` and `mask` (file paths or PNG bytes, base64 allowed) and optional `prompt`.
Output: a DataFrame with `image`: base64-encoded PNGs.
"""

from __future__ import annotations

import base64
import io
import json
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


class FluxFillInpainter(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from diffusers import FluxTransformer2DModel

        from fluxtune.assemble import load_bundle
        from fluxtune.flux.inpaint import fill_pipeline

        folder = Path(context.artifacts["checkpoint"])
        self.meta = json.loads((folder / "model.json").read_text())
        self.bundle = load_bundle(self.meta["model"])
        transformer = self.bundle.transformer
        if (folder / "base").is_dir():
            transformer = FluxTransformer2DModel.from_pretrained(folder / "base")
        transformer.eval()
        self.pipeline = fill_pipeline(self.bundle, transformer)
        if (folder / "adapter").is_dir():
            self.pipeline.load_lora_weights(str(folder / "adapter"))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        from PIL import Image

        from fluxtune.flux.inpaint import inpaint

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
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
