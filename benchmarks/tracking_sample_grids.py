"""What a sample-image grid adds to an evaluation, on the tiny model (CPU): evaluate() alone vs with the grid.

    .venv/bin/python benchmarks/tracking_sample_grids.py [--repeats 20] [--threads 1]

Prints one table; the ratio is what the MLflow images cost at each eval point.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fluxtune.components import loaded_components
from fluxtune.context import WorkerSetup, evaluate
from fluxtune.flux.encoded import ValidationSet, encode_examples
from fluxtune.flux.model import build_tiny_fill
from fluxtune.flux.preview import ValidationPreview


class _Quiet:
    def log(self, *a): ...
    def evaluation(self, *a): ...
    def stage_end(self, *a): ...


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--val", type=int, default=8, help="validation examples (the sample set of 64 has 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker with 1 CPU gets 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = build_tiny_fill(seed=0)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (args.val, 3, 64, 64)).astype("float32")
    mask = np.zeros((args.val, 1, 64, 64), "float32")
    mask[:, :, 16:48, 16:48] = 1
    encoded = encode_examples(bundle, image, mask, image, [None] * args.val)
    components = loaded_components()
    setup = WorkerSetup(train=encoded, val=ValidationSet.build(encoded, seed=1), batch_size=4, guidance=30.0,
                        loss_fn=components.get("loss", "flow_matching").build({"type": "flow_matching"}),
                        timesteps=components.get("timestep_sampler", "logit_normal").build({"type": "logit_normal"}),
                        reporter=_Quiet(), components=components, device=torch.device("cpu"))
    grids = ValidationPreview.for_worker({"preset": "tiny-fill", "seed": 0, "guidance": 30.0}, setup.val,
                                         lambda png, step: None)
    transformer = bundle.transformer

    def timed(with_grid: bool) -> list[float]:
        setup.preview = grids if with_grid else None
        evaluate(transformer, setup)  # warm-up
        out = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            evaluate(transformer, setup)
            out.append(time.perf_counter() - start)
        return out

    plain, with_grid = timed(False), timed(True)
    p, g = statistics.median(plain), statistics.median(with_grid)
    print(f"{'evaluation (tiny model, CPU, ' + str(args.val) + ' val examples)':<52} {'median ms':>10} {'ratio':>7}")
    print(f"{'val_loss only':<52} {p * 1e3:>10.1f} {1.0:>7.2f}")
    print(f"{'val_loss + sample grid (4 rows, 8 Euler steps)':<52} {g * 1e3:>10.1f} {g / p:>7.2f}")


if __name__ == "__main__":
    main()
