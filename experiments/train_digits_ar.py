"""Train the built-in AR digits model (agsearch/models/digits_ar/__init__.py) and keep its best checkpoint.

    python experiments/train_digits_ar.py     # writes agsearch/models/digits_ar/weights/digits_ar.{safetensors,json}

Stratified 80/20 split (seed 0, the classifier's split): trains on the 80% with 10% of labels
replaced by the null class (so CFG works), computes the validation NLL (nats/token, conditional,
and with the null class) on the held-out 20% after every epoch, and keeps the weights at the
minimum of the conditional validation NLL — 1,797 images are memorised quickly, so training past
the minimum only lowers the training NLL. Prints the numbers that go into DIGITS_AR_CARD.md and
writes them as JSON (``--log``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from agsearch.io import atomic_write_text
from agsearch.models.digits.data import (
    NULL_CLASS,
    load_digits_tensors,
    train_test_split_indices,
)
from agsearch.models.digits_ar import (
    WEIGHTS_DIR,
    DigitsAR,
    DigitsARConfig,
    images_to_tokens,
    save_model,
)


@torch.no_grad()
def nll(model: DigitsAR, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood in nats per token."""
    model.eval()
    logits = model(tokens, labels)
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=15, help="stop after this many epochs without a new minimum")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "digits_ar.safetensors")
    parser.add_argument("--log", type=Path, default=WEIGHTS_DIR / "digits_ar_training.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_tensors()
    tokens = images_to_tokens(images)  # (1797, 64)
    train_idx, val_idx = train_test_split_indices(labels)
    xt, yt, xv, yv = tokens[train_idx], labels[train_idx], tokens[val_idx], labels[val_idx]

    model = DigitsAR(DigitsARConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(xt) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = 2 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    print(f"DigitsAR: {model.num_params():,} parameters; {len(xt)} train / {len(xv)} validation images")

    best = {"val_nll": math.inf}
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total_loss = 0.0
        for lo in range(0, len(xt), args.batch_size):
            idx = perm[lo: lo + args.batch_size]
            x, y = xt[idx], yt[idx].clone()
            y[torch.rand(len(y), generator=gen) < args.cond_dropout] = NULL_CLASS  # condition dropout
            loss = F.cross_entropy(model(x, y).flatten(0, 1), x.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        row = {"epoch": epoch + 1, "train_loss": total_loss / len(xt), "val_nll": nll(model, xv, yv),
               "val_nll_uncond": nll(model, xv, torch.full_like(yv, NULL_CLASS)),
               "seconds": round(time.perf_counter() - start, 1)}
        history.append(row)
        mark = ""
        if row["val_nll"] < best["val_nll"]:
            best = dict(row, state=copy.deepcopy(model.state_dict()))
            mark = " *"
        print(f"epoch {row['epoch']:3d}  train {row['train_loss']:.4f}  val {row['val_nll']:.4f}  "
              f"val(null) {row['val_nll_uncond']:.4f}  {row['seconds']:.0f}s{mark}", flush=True)
        if epoch + 1 - best["epoch"] >= args.patience:
            print(f"no new validation minimum for {args.patience} epochs: stopping")
            break

    model.load_state_dict(best.pop("state"))
    summary = {
        "params": model.num_params(), "best_epoch": best["epoch"], "epochs_run": len(history),
        "seconds": history[-1]["seconds"],
        "val_nll": best["val_nll"], "val_nll_uncond": best["val_nll_uncond"],
        "train_nll": nll(model, xt, yt), "train_nll_uncond": nll(model, xt, torch.full_like(yt, NULL_CLASS)),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": history,
    }
    save_model(model, args.out)
    atomic_write_text(args.log, json.dumps(summary, indent=1) + "\n")
    print(f"best epoch {summary['best_epoch']}: val NLL {summary['val_nll']:.4f} nats/token "
          f"(null class {summary['val_nll_uncond']:.4f}), train NLL {summary['train_nll']:.4f}; "
          f"{summary['seconds']:.0f}s; wrote {args.out} and {args.log}")


if __name__ == "__main__":
    main()
