import copy

import pytest
import torch

from agsearch.baselines import make_baseline
from agsearch.eval.digits import balanced_labels
from agsearch.guidance.sampler import sample
from agsearch.models.digits.data import IMAGE_SHAPE, NULL_CLASS
from agsearch.policy import Policy
from agsearch.seeds import make_noise

T = 10


def hand_written_cfg(unet, scheduler, noise, labels, w, steps, cond_only=False):
    """Plain CFG, written out the way every pipeline does it (or no guidance at all)."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if cond_only:
            x = scheduler.step(unet(x_in, t, class_labels=labels).sample, t, x).prev_sample
            continue
        both = unet(torch.cat([x_in, x_in]), t,
                    class_labels=torch.cat([labels, torch.full_like(labels, NULL_CLASS)])).sample
        eps_c, eps_u = both.chunk(2)
        x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x).prev_sample
    return x


@torch.no_grad()
def test_full_cfg_policy_equals_hand_written_loop(denoiser, random_unet, scheduler):
    noise, labels = make_noise(range(6), IMAGE_SHAPE), balanced_labels(6)
    expected = hand_written_cfg(random_unet, scheduler, noise, labels, 1.5, T)
    out = sample(denoiser, scheduler, make_baseline("cfg", T, 1.5), noise, labels)
    assert (out.samples - expected).abs().max().item() <= 1e-6
    assert out.nfe.tolist() == [2 * T] * 6


@torch.no_grad()
def test_cond_policy_equals_unguided_loop(denoiser, random_unet, scheduler):
    noise, labels = make_noise(range(4), IMAGE_SHAPE), balanced_labels(4)
    expected = hand_written_cfg(random_unet, scheduler, noise, labels, 1.5, T, cond_only=True)
    out = sample(denoiser, scheduler, make_baseline("cond", T, 1.5), noise, labels)
    assert (out.samples - expected).abs().max().item() <= 1e-6
    assert out.nfe.tolist() == [T] * 4


@torch.no_grad()
def test_static_policy_counts_nfe_and_skips_passes(denoiser, scheduler):
    policy = make_baseline("cutoff", T, 2.0, fraction=0.3)
    out = sample(denoiser, scheduler, policy, make_noise(range(5), IMAGE_SHAPE), balanced_labels(5))
    assert policy.nfe == 3 * 2 + 7
    assert out.nfe.tolist() == [policy.nfe] * 5
    assert denoiser.evaluations == policy.nfe * 5  # the skipped passes really were skipped
    assert denoiser.calls == T


@torch.no_grad()
def test_per_step_scale_and_uncond_op(denoiser, random_unet, scheduler):
    noise, labels = make_noise(range(3), IMAGE_SHAPE), balanced_labels(3)
    uncond = Policy.static(["uncond"] * T, 1.5)
    zero = Policy.static([{"op": "cfg", "scale": 0.0}] * T, 1.5)
    a = sample(denoiser, scheduler, uncond, noise, labels)
    b = sample(denoiser, scheduler, zero, noise, labels)
    # The random UNet's Euler/DPM++ samples reach ~1e4: the tolerance scales with them (one and
    # two torch threads batch the passes differently).
    assert torch.allclose(a.samples, b.samples, rtol=1e-5, atol=1e-5 * max(1.0, float(b.samples.abs().max())))
    assert a.nfe.tolist() == [T] * 3 and b.nfe.tolist() == [2 * T] * 3


@torch.no_grad()
def test_ag_rule_decides_per_sample_and_really_skips(denoiser, scheduler):
    n = 8
    noise, labels = make_noise(range(n), IMAGE_SHAPE), balanced_labels(n)
    full = sample(denoiser, scheduler, make_baseline("cfg", T, 1.5), noise, labels)
    # A threshold between the samples' cosines at the first step splits the batch.
    gamma = full.cosine_x0
    threshold = float(gamma[0].median())
    policy = make_baseline("ag", T, 1.5, threshold=threshold)
    before = denoiser.evaluations
    out = sample(denoiser, scheduler, policy, noise, labels)
    assert denoiser.evaluations - before == int(out.nfe.sum())
    # Expected NFE per sample from the full-CFG cosines (the trajectories agree until the stop).
    crossed = gamma >= threshold  # (T, B)
    first = torch.where(crossed.any(0), crossed.float().argmax(0), torch.full((n,), T))
    guided = (first + 1).clamp(max=T)
    assert out.nfe.tolist() == (2 * guided + (T - guided)).float().tolist()
    assert len(set(out.nfe.tolist())) > 1  # samples decided differently
    # Samples that never crossed equal full CFG.
    never = ~crossed.any(0)
    if never.any():
        assert torch.allclose(out.samples[never], full.samples[never], atol=1e-6)


@torch.no_grad()
def test_ag_in_eps_space_and_threshold_extremes(denoiser, scheduler):
    noise, labels = make_noise(range(4), IMAGE_SHAPE), balanced_labels(4)
    always = sample(denoiser, scheduler, make_baseline("ag", T, 1.5, threshold=1.0, space="eps"), noise, labels)
    never = sample(denoiser, scheduler, make_baseline("ag", T, 1.5, threshold=-1.0), noise, labels)
    assert always.nfe.max().item() <= 2 * T
    assert never.nfe.tolist() == [T + 1] * 4  # one CFG step to observe γ, then cond


def test_soft_weights_carry_gradients(denoiser, scheduler):
    """Dense weights mix ops and gradients reach them: the search's relaxation uses this loop."""
    from agsearch.guidance.controllers import StepPlan

    logits = torch.zeros(T, 2, requires_grad=True)

    class Soft:
        num_inference_steps = T
        guidance_scale = 1.5  # for a cfg op without its own scale
        ops = [{"op": "cfg", "scale": 2.0}, {"op": "cond"}]

        def plan(self, i, batch, device):
            return StepPlan(self.ops, logits[i].softmax(-1).expand(batch, 2))

        def observe(self, i, stats):
            pass

    out = sample(denoiser, scheduler, None, make_noise(range(2), IMAGE_SHAPE), balanced_labels(2), controller=Soft())
    out.samples.pow(2).mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_noise_is_per_sample():
    a = make_noise([5, 6, 7], IMAGE_SHAPE)
    b = make_noise([7], IMAGE_SHAPE)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])


def test_sample_needs_policy_or_controller(denoiser, scheduler):
    with pytest.raises(ValueError, match="needs a policy"):
        sample(denoiser, scheduler, None, make_noise([0], IMAGE_SHAPE), balanced_labels(1))


def test_a_repeated_resume_runs_several_continuations_in_one_batch(denoiser, scheduler):
    """``Resume.repeat``: one paused trajectory continued under three policies in one batch gives
    each continuation run alone (DPM++ carries a per-sample history of model outputs)."""
    from agsearch.guidance.sampler import Resume

    noise, labels = make_noise(list(range(4)), IMAGE_SHAPE), torch.arange(4)
    head = ["cfg", "cfg", "cond", "cfg"]
    tails = [["cfg"] * 6, ["cond"] * 6, [{"op": "cfg", "scale": 5.0}, *["cond"] * 5]]
    paused = {}
    sample(denoiser, scheduler, Policy.static(head + tails[0], 3.0), noise, labels,
           callback=lambda st: paused.setdefault(st.i, Resume(st.i, st.x, copy.deepcopy(st.scheduler))))
    resume = paused[len(head)]
    alone = [sample(denoiser, scheduler, Policy.static(head + tail, 3.0), noise, labels, resume=resume).samples
             for tail in tails]
    from agsearch.search.gates import GateController

    ops = [{"op": "cfg"}, {"op": "cond"}, {"op": "cfg", "scale": 5.0}]
    picks = [[ops.index(s if isinstance(s, dict) else {"op": s}) for s in head + tail] for tail in tails]
    weights = torch.cat([torch.nn.functional.one_hot(torch.tensor(p), 3).float().expand(4, -1, -1) for p in picks])
    together = sample(denoiser, scheduler, None, noise.repeat(3, 1, 1, 1), labels.repeat(3),
                      controller=GateController(ops, weights, 3.0, False), resume=resume.repeat(3)).samples
    for j in range(3):
        torch.testing.assert_close(together[4 * j:4 * (j + 1)], alone[j], rtol=1e-5, atol=1e-5)
        # ``part`` takes copy j back out of the batch, scheduler history included.
        part = resume.repeat(3).part(j, 3)
        assert part.i == resume.i and torch.equal(part.x, resume.x)
        history = zip(getattr(part.scheduler, "model_outputs", []), getattr(resume.scheduler, "model_outputs", []))
        assert all(torch.equal(a, b) for a, b in history if isinstance(a, torch.Tensor))
        torch.testing.assert_close(
            sample(denoiser, scheduler, Policy.static(head + tails[j], 3.0), noise, labels, resume=part).samples,
            alone[j], rtol=0, atol=0)
