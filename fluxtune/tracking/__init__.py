"""MLflow: the run tree of a sweep, metrics, artifacts, and the model registry. The only importer of mlflow."""
