"""Does the key/value cache pay? Time AR sampling of the built-in model with and without it.

    python experiments/bench_ar_cache.py [--samples 100]

Samples the same seeds both ways (CFG, s = 3: 2 passes per token), checks that the tokens are
identical and prints both wall times.
"""

from __future__ import annotations

import argparse
import time

import torch

from agsearch.eval.digits import balanced_labels
from agsearch.models.digits_ar import generate, load_model
from agsearch.seeds import sample_seeds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--scale", type=float, default=3.0)
    args = parser.parse_args(argv)
    model = load_model()
    labels, seeds = balanced_labels(args.samples), sample_seeds(1, args.samples)
    times, outs = {}, {}
    for cache in (True, False):
        start = time.perf_counter()
        outs[cache] = generate(model, labels, seeds, args.scale, use_cache=cache)
        times[cache] = time.perf_counter() - start
    assert torch.equal(outs[True], outs[False]), "the cache changed the samples"
    print(f"{args.samples} samples, CFG s={args.scale:g}: with KV cache {times[True]:.2f} s, "
          f"without {times[False]:.2f} s ({times[False] / times[True]:.1f}x); identical tokens")


if __name__ == "__main__":
    main()
