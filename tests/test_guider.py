"""PolicyGuidance: a diffusers guider (modular pipelines) that executes a static policy."""

import pytest
import torch

pytest.importorskip("diffusers")

from agsearch import Policy
from agsearch.diffusers.guider import PolicyGuidance  # noqa: E402


def test_guider_runs_the_policy_per_step():
    policy = Policy.static(["cfg", {"op": "cfg", "scale": 2.0}, "cond"], 5.0)
    guider = PolicyGuidance.from_policy(policy)
    assert guider.config.ops == ["cfg", "cfg", "cond"] and guider.config.scales == [5.0, 2.0, 5.0]
    assert guider.num_conditions == 2  # before the loop: the negative prompt must be encoded
    c, u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for step, (conditions, expected) in enumerate([(2, u + 5.0 * (c - u)), (2, u + 2.0 * (c - u)), (1, c)]):
        guider.set_state(step, 3, torch.tensor(999))
        assert guider.num_conditions == conditions
        out = guider.forward(c, u if conditions == 2 else None)
        torch.testing.assert_close(out.pred, expected)
    guider.set_state(0, 4, torch.tensor(999))
    with pytest.raises(ValueError, match="the policy has 3 steps but the pipeline runs 4"):
        guider.num_conditions


def test_guider_runs_an_adaptive_rule_per_batch():
    policy = Policy.adaptive(3, 5.0, [0.5, 0.5, 0.5], space="eps", stop_scales=[5.0, 3.0, 5.0])
    guider = PolicyGuidance.from_policy(policy)
    c = torch.randn(2, 4, 8, 8)
    far, near = -c + 0.1 * torch.randn(2, 4, 8, 8), c + 0.1 * torch.randn(2, 4, 8, 8)  # γ ≈ -1 and ≈ 1
    mixed = torch.stack([far[0], near[1]])
    for _ in range(2):  # a second trajectory starts guiding again
        steps = []
        for step, u in enumerate([mixed, near, near]):
            guider.set_state(step, 3, torch.tensor(999))
            steps.append(guider.num_conditions)
            out = guider.forward(c, u if guider.num_conditions == 2 else None)
            if step == 1:  # both samples agree now: the batch stops, at the stop scale
                torch.testing.assert_close(out.pred, u + 3.0 * (c - u))
        assert steps == [2, 2, 1]  # one sample still disagreed at step 0: the batch kept guiding
        torch.testing.assert_close(out.pred, c)


@pytest.mark.parametrize("policy,fragment", [
    (Policy.static(["cfg", {"op": "affine", "coef": {"eps_c": 1.0, "eps_c_prev": 0.0, "eps_u_prev": 0.0, "x": 0.0,
                                                     "bias": 0.0}}], 5.0), "'affine'"),
    (Policy.adaptive(4, 5.0, 0.9), "eps space only"),
])
def test_guider_refuses_what_it_cannot_run(policy, fragment):
    with pytest.raises(ValueError, match=fragment):
        PolicyGuidance.from_policy(policy)


def modular_sdxl_latents(standard, policy: Policy, latents: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The latents of the modular SDXL pipeline on ``standard``'s components under the policy's
    guider, and the rows that reached the UNet per call."""
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLAutoBlocks,
    )

    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in standard.components.items() if v is not None},
                              guider=PolicyGuidance.from_policy(policy))
    modular.set_progress_bar_config(disable=True)
    rows = []
    handle = standard.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        out = modular(prompt="a red cube", num_inference_steps=4, latents=latents.clone(), height=32, width=32,
                      output="latents")
    finally:
        handle.remove()
    return out, rows


def test_guider_in_a_modular_sdxl_pipeline_matches_apply_policy():
    from agsearch import apply_policy
    from agsearch import testing as tiny_pipelines

    standard = tiny_pipelines.tiny_sdxl()
    policy = Policy.static(["cfg", "cfg", "uncond", "cond"], 5.0)  # uncond: its batch only
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours, rows = modular_sdxl_latents(standard, policy, latents)
    assert sum(rows) == policy.nfe  # the unconditional forward is skipped on cond steps
    with apply_policy(standard, policy):
        theirs = standard("a red cube", num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                          height=32, width=32, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_adaptive_guider_in_a_modular_sdxl_pipeline_matches_apply_policy_for_one_sample():
    """At batch 1 the batch-level rule is the per-sample rule: the modular pipeline under the guider
    gives apply_policy's latents and skips the same unconditional passes."""
    from agsearch import apply_policy
    from agsearch import testing as tiny_pipelines

    standard = tiny_pipelines.tiny_sdxl()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with apply_policy(standard, Policy.adaptive(4, 5.0, 1.0, space="eps")) as probe:  # θ = 1: never stops
        standard("a red cube", num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(), height=32,
                 width=32, output_type="latent")
    gammas = [float(g[0]) for g in probe.gammas]
    assert max(gammas[1:3]) > gammas[0]  # so this threshold stops the rule at step 1 or 2
    policy = Policy.adaptive(4, 5.0, max(gammas[1:3]), space="eps")
    ours, rows = modular_sdxl_latents(standard, policy, latents)
    with apply_policy(standard, policy) as runner:
        theirs = standard("a red cube", num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                          height=32, width=32, output_type="latent").images
    assert 4 < sum(rows) == runner.nfe.item() < 8  # it stopped guiding part-way, in both
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("adaptive", [False, True])
def test_guider_in_a_modular_wan_pipeline_matches_apply_policy(adaptive):
    """The modular Wan 2.1 pipeline (two passes per step as two batches of the guider) under the
    policy's guider gives the WanPipeline's latents under apply_policy, with the same rows."""
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks

    from agsearch import apply_policy
    from agsearch import testing as tiny_pipelines

    standard = tiny_pipelines.tiny_wan()
    call = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, height=32, width=32,
                num_frames=5, max_sequence_length=16)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    if adaptive:  # a threshold just below the first step's agreement: the rule stops there
        with apply_policy(standard, Policy.adaptive(3, 4.0, 1.0, space="eps")) as probe:
            standard(**call, guidance_scale=4.0, latents=latents.clone(), output_type="latent")
        policy = Policy.adaptive(3, 4.0, float(probe.gammas[0][0]) - 1e-6, space="eps")
    else:
        policy = Policy.static(["cfg", {"op": "cfg", "scale": 2.0}, "cond"], 4.0)
    modular = WanBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in standard.components.items() if v is not None},
                              guider=PolicyGuidance.from_policy(policy))
    modular.set_progress_bar_config(disable=True)
    rows = []
    handle = standard.transformer.patch_embedding.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        ours = modular(**call, latents=latents.clone(), output="latents")
    finally:
        handle.remove()
    with apply_policy(standard, policy) as runner:
        theirs = standard(**call, guidance_scale=4.0, latents=latents.clone(), output_type="latent").frames
    assert sum(rows) == runner.nfe.item() == (4 if adaptive else 5)  # adaptive: cfg, then cond
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
