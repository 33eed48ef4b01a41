"""Experiment and search configuration: typed schema, YAML with positions, located errors."""
