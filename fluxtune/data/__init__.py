"""Training data: the JSONL row format, its checks, image loading, and a generated sample dataset.

Import-light on purpose (numpy and Pillow only): `fluxtune validate` checks data without torch or ray.
"""
