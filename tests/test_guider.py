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


@pytest.mark.parametrize("policy,fragment", [
    (Policy.static(["cfg", "uncond"], 5.0), "'uncond'"),
    (Policy.adaptive(4, 5.0, 0.9), "static policies"),
])
def test_guider_refuses_what_it_cannot_run(policy, fragment):
    with pytest.raises(ValueError, match=fragment):
        PolicyGuidance.from_policy(policy)


def test_guider_in_a_modular_sdxl_pipeline_matches_apply_policy():
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLAutoBlocks,
    )

    from agsearch import apply_policy
    from agsearch import testing as tiny_pipelines

    standard = tiny_pipelines.tiny_sdxl()
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    policy = Policy.static(["cfg", "cfg", "cond", "cond"], 5.0)
    modular.update_components(**{k: v for k, v in standard.components.items() if v is not None},
                              guider=PolicyGuidance.from_policy(policy))
    modular.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = []
    handle = standard.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        ours = modular(prompt="a red cube", num_inference_steps=4, latents=latents.clone(), height=32, width=32,
                       output="latents")
    finally:
        handle.remove()
    assert sum(rows) == policy.nfe  # the unconditional forward is skipped on cond steps
    with apply_policy(standard, policy):
        theirs = standard("a red cube", num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
                          height=32, width=32, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
