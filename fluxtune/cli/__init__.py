"""The `fluxtune` command line (Typer). Commands import heavy libraries only when they run."""
