"""Train the built-in digits classifier (accuracy and Fréchet-distance features for evaluation).

    python experiments/train_classifier.py            # writes agsearch/models/digits/weights/digits_classifier.safetensors

Stratified 80/20 split (seed 0); trained on the 80% with small random shifts and pixel noise so
that it also reads generated digits, evaluated on the held-out 20%. Prints the held-out accuracy,
which goes into the model card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from agsearch.models.digits import WEIGHTS_DIR, DigitsClassifier
from agsearch.models.digits.data import load_digits_tensors, train_test_split_indices


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel and a little Gaussian noise."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    x = padded[..., dy : dy + 8, dx : dx + 8]
    return x + 0.1 * torch.randn(x.shape, generator=generator)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "digits_classifier.safetensors")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    train_idx, test_idx = train_test_split_indices(labels)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(train_idx) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for batch in perm.split(args.batch_size):
            loss = F.cross_entropy(model(augment(images[batch], gen)), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
        print(f"epoch {epoch + 1:3d}  train loss {loss.item():.4f}  held-out acc {acc:.4f}")
    seconds = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(args.out))
    report = {"held_out_accuracy": acc, "held_out_size": len(test_idx), "train_size": len(train_idx),
              "epochs": args.epochs, "seed": args.seed, "seconds": round(seconds, 1)}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
