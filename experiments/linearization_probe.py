"""How well do gate gradients predict the effect of changing one step's op?

    python experiments/linearization_probe.py

Starts from the cutoff policy (CFG at w on the first 10 of 25 DDIM steps, then cond) on 64 search
pairs, takes the gradient of the final-sample MSE to full CFG with respect to the one-hot op
weights, and compares, for a few single-step changes, the first-order prediction
g[t, new] − g[t, old] with the actual change of the MSE. Prints one line per change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agsearch.search.data import PairDataset  # noqa: E402
from agsearch.search.gates import PolicySearchModule  # noqa: E402

CHANGES = [(0, "cfg@1.15"), (0, "cond"), (3, "cfg@1.15"), (3, "cond"), (9, "cfg@1.15"), (9, "cond"), (12, "cfg"), (20, "cfg")]


def main() -> int:
    module = PolicySearchModule(model="digits", space="cfg_scales", budget=35, checkpointing=False)
    labels = module.space.labels(module.candidates)
    pairs = PairDataset(0, 64)
    batch = pairs.batch()
    T, K = module.num_inference_steps, len(labels)
    base = torch.zeros(T, K)
    base[:10, labels.index("cfg")] = 1
    base[10:, labels.index("cond")] = 1
    weights = base.clone().requires_grad_(True)
    distance, _ = module._student_distance(batch, weights.expand(len(pairs), -1, -1), True, False)
    distance.backward()
    print(f"cutoff-10/25 at w={module.guidance_scale:g}: MSE to full CFG {distance.item():.4e} on {len(pairs)} pairs")
    with torch.no_grad():
        for t, new in CHANGES:
            old = int(base[t].argmax())
            k = labels.index(new)
            predicted = (weights.grad[t, k] - weights.grad[t, old]).item()
            changed = base.clone()
            changed[t] = 0
            changed[t, k] = 1
            after, _ = module._student_distance(batch, changed.expand(len(pairs), -1, -1), False, False)
            print(f"step {t:2d}: {labels[old]:>8} -> {new:<8}  predicted {predicted:+.2e}  actual {after.item() - distance.item():+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
