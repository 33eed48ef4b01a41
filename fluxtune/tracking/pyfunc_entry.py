"""MLflow "model from code" entry point: the registered model is this file, not a pickled object."""

from mlflow.models import set_model

from fluxtune.tracking.pyfunc import FluxFillInpainter

set_model(FluxFillInpainter())
