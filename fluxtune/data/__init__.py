"""Training data: the JSONL row format, its checks, image loading, a generated sample dataset, the latent cache
and the stream trials read it with.

Import-light on purpose (numpy and Pillow only; torch in `stream` alone): `fluxtune validate` checks data without
torch or ray.
"""
