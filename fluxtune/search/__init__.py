"""Search: the YAML space as an Optuna define-by-run function, driven by Ray Tune."""
