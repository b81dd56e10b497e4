"""Denoiser adapters: every model backend behind the one contract of ``agsearch.denoisers.Denoiser``.

``ClassConditionalDenoiser`` wraps a class-conditional diffusers ``UNet2DModel`` (the built-in
digits model): the condition is a (B,) tensor of class labels, the unconditional pass uses the
null class. Both passes go into one batched forward, and only for the samples that need them.
"""

from __future__ import annotations

import torch


class ClassConditionalDenoiser:
    """Adapter over a class-conditional ``UNet2DModel`` whose null class means "no condition".

    ``calls`` counts forward calls and ``evaluations`` counts per-sample evaluations (NFE summed
    over the batch), so tests can check that skipped passes are really skipped.
    """

    parameterisation = "epsilon"

    def __init__(self, unet, null_class: int):
        self.unet = unet
        self.null_class = null_class
        self.calls = 0
        self.evaluations = 0

    def __call__(self, x, t, cond, run_cond, run_uncond):
        labels = torch.cat([cond[run_cond], torch.full_like(cond[run_uncond], self.null_class)])
        x_in = torch.cat([x[run_cond], x[run_uncond]])  # (n_c + n_u, C, H, W)
        out_c = torch.zeros_like(x)
        out_u = torch.zeros_like(x)
        if len(x_in) == 0:
            return out_c, out_u
        self.calls += 1
        self.evaluations += len(x_in)
        out = self.unet(x_in, t, class_labels=labels).sample.to(x.dtype)
        n_c = int(run_cond.sum())
        # index_put keeps the graph for the search's backward pass.
        out_c = out_c.index_put((run_cond.nonzero(as_tuple=True)[0],), out[:n_c])
        out_u = out_u.index_put((run_uncond.nonzero(as_tuple=True)[0],), out[n_c:])
        return out_c, out_u
