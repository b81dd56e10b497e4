"""``apply_policy`` on diffusers' ``StableDiffusionInstructPix2PixPipeline``: two-condition policies.

The pipeline guides on the input image and the instruction with one UNet call per step on three
thirds, ``[ε(image, text); ε(image, ∅); ε(∅, ∅)]``, and combines them as
``ε_∅ + s_T (ε_IT − ε_I) + s_I (ε_I − ε_∅)`` (``guidance_scale``, ``image_guidance_scale``).
Under a policy with ``"conditions": 2`` each step runs only the rows its op needs (``edit`` all
three, ``text`` the first two, ``joint`` the first and last, ``cond`` the first: the batch really
shrinks), computes the op's output (:func:`agsearch.guidance.ops.edit_output`) and hands it back in
all three thirds, so the pipeline's own arithmetic returns it unchanged. A step that is ``edit`` at
the call's own scales runs the pipeline's forward untouched. The adaptive rule observes γ_t of both
guidance directions (:func:`agsearch.guidance.ops.edit_agreement`, x̂0 or ε space) where all three
passes ran.

The call must build the three-way batch when the policy needs more than the ``cond`` pass: the
pipeline does for ``guidance_scale > 1`` and ``image_guidance_scale >= 1``.
"""

from __future__ import annotations

import torch

from agsearch.diffusers.hook import PolicyRunner, pipeline_x0
from agsearch.guidance.controllers import AGController, StepStats, controller_for
from agsearch.guidance.ops import edit_agreement, edit_op_passes, edit_output

ENABLE = "pass guidance_scale > 1 and image_guidance_scale >= 1"


class EditRunner(PolicyRunner):
    """:class:`~agsearch.diffusers.hook.PolicyRunner` for the three-way pattern; ``nfe``, ``ops``,
    ``gammas`` and ``forward_rows`` report as there."""

    def _call(self, key: int, *args, **kwargs):
        if self.step is None:  # the denoiser called outside a pipeline call: leave it alone
            return self._forwards[key](*args, **kwargs)
        if self._current is not None:
            raise ValueError(f"the denoiser ran twice in step {self.step}; only one denoiser call per step is supported")
        bound = self._signatures[key].bind(*args, **kwargs)
        x_in = next(iter(bound.arguments.values()))  # the noisy latent and the image latent, on channels
        three = bool(self.pipe.do_classifier_free_guidance)
        n = x_in.shape[0] // 3 if three else x_in.shape[0]
        i, timesteps = self.step, self.pipe.scheduler.timesteps
        if i >= len(timesteps):
            raise ValueError(f"the denoiser ran at step {i + 1} of a {len(timesteps)}-step call; "
                             "only one step per scheduler step is supported")
        if i == 0:
            policy = self.policy.for_steps(len(timesteps), self.resample)
            self.controller = controller_for(policy)
            self.scales = float(policy.guidance_scale), float(policy.image_guidance_scale)
        plan = self.controller.plan(i, n, x_in.device)
        ops = [plan.ops[k] for k in plan.weights.argmax(dim=1).tolist()]
        need = torch.tensor([edit_op_passes(op) for op in ops], device=x_in.device)  # (N, 3): full, image, none
        if not three and bool(need[:, 1:].any()):
            raise ValueError("the policy runs image or unconditional passes but the pipeline call builds no "
                             f"three-way batch (guidance_scale={self.pipe.guidance_scale}, image_guidance_scale="
                             f"{self.pipe.image_guidance_scale}); {ENABLE}")
        self.nfe = (self.nfe if self.nfe is not None else 0) + need.sum(dim=1).float()
        self.ops.append([op["op"] for op in ops])
        self._current = True
        if not three:  # the instruction's rows only: the pipeline uses the output as it is
            return self._run(key, bound, torch.arange(n), n)[0]
        call = (float(self.pipe.guidance_scale), float(self.pipe.image_guidance_scale))
        if not isinstance(self.controller, AGController) and all(
                op["op"] == "edit" and (op.get("scale", self.scales[0]), op.get("image_scale", self.scales[1])) == call
                for op in ops):
            return self._run(key, bound, torch.arange(3 * n), 3 * n)[0]  # the pipeline's own step
        rows = [need[:, p].nonzero().flatten() for p in range(3)]
        out, pred = self._run(key, bound, torch.cat([r + p * n for p, r in enumerate(rows)]), 3 * n)
        passes, lo = [], 0
        for r in rows:
            full = pred.new_zeros((n,) + pred.shape[1:])
            full[r] = pred[lo:lo + len(r)]
            passes.append(full)
            lo += len(r)
        if isinstance(self.controller, AGController):
            ops = self._observe(i, x_in[:n, : pred.shape[1]], passes, need, plan)
        target = torch.empty_like(passes[0])
        groups: dict[str, list[int]] = {}
        for j, op in enumerate(ops):
            groups.setdefault(repr(sorted(op.items())), []).append(j)
        for members in groups.values():
            r = torch.tensor(members, device=pred.device)
            target[r] = edit_output(ops[members[0]], *(p[r] for p in passes), *self.scales)
        return self._wrap(out, torch.cat([target, target, target]))

    def _observe(self, i: int, x_in: torch.Tensor, passes: list[torch.Tensor], need: torch.Tensor, plan) -> list[dict]:
        """The adaptive rule sees γ_t where all three passes ran; returns each sample's op after it."""
        every = need.all(dim=1)
        nan = torch.full((len(every),), float("nan"), device=x_in.device)
        cos_x0, cos_eps = nan.clone(), nan.clone()
        t = self.pipe.scheduler.timesteps[i]
        if bool(every.any()):
            x0 = [pipeline_x0(self.pipe.scheduler, x_in.float(), p.float(), t, i, self.parameterisation) for p in passes]
            cos_x0 = torch.where(every, edit_agreement(*x0), nan)
            cos_eps = torch.where(every, edit_agreement(*(p.float() for p in passes)), nan)
        self.gammas.append(cos_x0 if self.controller.space == "x0" else cos_eps)
        self.controller.observe(i, StepStats(i, t, x_in, passes[0], passes[2], need[:, 0], need[:, 2], every,
                                             cos_x0, cos_eps, out_image=passes[1]))
        return [plan.ops[k] for k in plan.weights.argmax(dim=1).tolist()]
