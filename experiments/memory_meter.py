"""Time and memory of one search step (forward + backward through T steps), with and without
gradient checkpointing.

Memory is measured two ways. ``saved_mib``: the bytes autograd keeps for the backward pass,
counted by a ``saved_tensors_hooks`` pack hook (distinct storages only), plus, with
checkpointing, the input each checkpointed call holds for its recomputation — exact, on any
device, and the quantity checkpointing is meant to bound. ``cuda_peak_mib``: ``torch.cuda.max_memory_allocated``
over the step, on CUDA only.
"""

from __future__ import annotations

import time

import torch

from agsearch.guidance.sampler import sample
from agsearch.search.backends import CheckpointedDenoiser
from agsearch.search.gates import GateController


class SavedTensorMeter:
    """Counts the distinct storage bytes autograd saves for backward inside the context."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse)
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def measure_step(denoiser, scheduler, noise: torch.Tensor, cond, candidates: list[dict], guidance_scale: float,
                 num_inference_steps: int, checkpointing: bool, autocast_dtype: torch.dtype | None = None) -> dict:
    """Time and memory of one differentiable trajectory of ``num_inference_steps`` steps with
    uniform soft gates over ``candidates`` (every op's passes run), and its backward pass."""
    device = noise.device
    logits = torch.zeros(num_inference_steps, len(candidates), device=device, requires_grad=True)
    weights = logits.softmax(dim=1).expand(len(noise), -1, -1)
    controller = GateController(candidates, weights, guidance_scale, compute_all=True)
    meter = SavedTensorMeter()
    checkpointed = CheckpointedDenoiser(denoiser)

    def wrapped(x, t, cond, run_cond, run_uncond):
        if not checkpointing:
            return denoiser(x, t, cond, run_cond, run_uncond)
        meter.bytes += x.numel() * x.element_size()  # what a checkpoint keeps: its input
        return checkpointed(x, t, cond, run_cond, run_uncond)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    noise = noise.detach().requires_grad_(False)
    with meter, torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = sample(wrapped, scheduler, None, noise, cond, controller=controller)
    loss = out.samples.float().pow(2).mean()
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {
        "num_inference_steps": num_inference_steps, "checkpointing": checkpointing, "batch": len(noise),
        "seconds": round(seconds, 3), "saved_mib": round(meter.bytes / 2**20, 2),
        "cuda_peak_mib": round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1) if cuda else None,
        "gate_grad_finite": bool(torch.isfinite(logits.grad).all()),
    }
    return result
