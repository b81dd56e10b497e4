"""apply_policy on unmodified diffusers pipelines (tiny SD, SDXL and SD3 built offline)."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers.callbacks  # noqa: E402

from agsearch import Policy, PolicyError, apply_policy
from agsearch import testing as tiny_pipelines

T = 4
W = 5.0
CUTOFF = {"sd": "SDCFGCutoffCallback", "sdxl": "SDXLCFGCutoffCallback", "sd3": "SD3CFGCutoffCallback"}


def _denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet


def _call(pipe, prompt, seed=0, **kwargs):
    size = 16 if hasattr(pipe, "transformer") else 32  # 16×16 latents, to keep the tests fast
    kwargs = {"num_inference_steps": T, "guidance_scale": W, "output_type": "pt", "height": size, "width": size,
              **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


class RowCounter:
    """Counts the rows (per-sample evaluations) that really reach the denoiser's first layer."""

    def __init__(self, pipe):
        denoiser = _denoiser(pipe)
        first = denoiser.pos_embed if hasattr(denoiser, "pos_embed") else denoiser.conv_in
        self.rows, self.calls = 0, 0
        self.handle = first.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_full_cfg_policy_gives_the_plain_pipeline_images(pipes, name):
    pipe = pipes[name]
    kwargs = dict(negative_prompt=["blurry", "ugly"], num_images_per_prompt=2)
    plain = _call(pipe, ["a red cube", "a dog"], **kwargs)
    with apply_policy(pipe, Policy.static(["cfg"] * T, W)) as runner:
        ours = _call(pipe, ["a red cube", "a dog"], **kwargs)
    assert ours.shape == (4,) + plain.shape[1:]
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    assert runner.nfe.tolist() == [2.0 * T] * 4


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_denoiser_evaluations_equal_the_policy_nfe(pipes, name):
    pipe = pipes[name]
    policy = Policy.static(["cfg", {"op": "cfg", "scale": 3.0}, "cond", "uncond"], W)
    with apply_policy(pipe, policy) as runner, RowCounter(pipe) as counter:
        _call(pipe, ["a red cube", "a dog"], negative_prompt=["blurry", "ugly"])
    assert policy.nfe == 6
    assert runner.nfe.tolist() == [6.0, 6.0]
    assert counter.rows == 2 * policy.nfe and counter.calls == T  # the batch really shrinks
    with RowCounter(pipe) as counter:
        _call(pipe, ["a red cube", "a dog"])
    assert counter.rows == 2 * 2 * T  # plain CFG, for comparison


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_cond_after_step_k_matches_the_diffusers_cfg_cutoff_callback(pipes, name):
    pipe, k = pipes[name], 1
    callback = getattr(diffusers.callbacks, CUTOFF[name])(cutoff_step_ratio=None, cutoff_step_index=k)
    # The callback switches CFG off after step k: steps 0..k guided, the rest conditional only.
    theirs = _call(pipe, "a red cube", callback_on_step_end=callback)
    policy = Policy.static(["cfg"] * (k + 1) + ["cond"] * (T - k - 1), W)
    with apply_policy(pipe, policy), RowCounter(pipe) as counter:
        ours = _call(pipe, "a red cube")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert counter.rows == policy.nfe


def test_per_step_scales_apply(pipes):
    pipe = pipes["sd"]
    plain = _call(pipe, "a red cube", guidance_scale=3.0)
    with apply_policy(pipe, Policy.static([{"op": "cfg", "scale": 3.0}] * T, W)):
        ours = _call(pipe, "a red cube", guidance_scale=W)  # the policy's scales win
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)


def test_negative_prompts_change_cfg_steps_only(pipes):
    pipe = pipes["sd"]
    seen = []  # per denoiser call: the text embeddings of its rows
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        policy = Policy.static(["cfg", "cfg", "cond", "cond"], W)
        with apply_policy(pipe, policy):
            a = _call(pipe, "a red cube", negative_prompt="blurry")
            b = _call(pipe, "a red cube", negative_prompt="a green sphere")
    finally:
        handle.remove()
    assert not torch.allclose(a, b)  # the negative prompt is used on the CFG steps ...
    neg_a, cond = pipe.encode_prompt("a red cube", "cpu", 1, True, "blurry")[::-1]
    # the hook sees the wrapper's input: two rows (negative, cond) on every step; the rows that
    # reached the model are counted separately below.
    torch.testing.assert_close(seen[0], torch.cat([neg_a, cond]))
    with apply_policy(pipe, Policy.static(["cond"] * T, W)), RowCounter(pipe) as counter:
        c = _call(pipe, "a red cube", negative_prompt="blurry")
        d = _call(pipe, "a red cube", negative_prompt="a green sphere")
    torch.testing.assert_close(c, d, rtol=0, atol=0)  # ... and nowhere else
    assert counter.rows == 2 * T


def test_adaptive_guidance_switches_per_sample(pipes):
    pipe = pipes["sd"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prompts = ["a red cube", "a photo of a dog on the beach"]
    with apply_policy(pipe, Policy.adaptive(T, W, threshold=1.0)) as runner:  # γ < 1: never switches
        _call(pipe, prompts, latents=latents)
    gamma0 = runner.gammas[0]
    assert runner.nfe.tolist() == [2.0 * T] * 2 and gamma0.isfinite().all() and gamma0[0] != gamma0[1]
    threshold = float(gamma0.mean())  # between the two samples: exactly one stops guiding after step 0
    with apply_policy(pipe, Policy.adaptive(T, W, threshold=threshold)) as runner, RowCounter(pipe) as counter:
        both = _call(pipe, prompts, latents=latents)
    switched = int(gamma0.argmax())
    assert runner.ops[1][switched] == "cond" and runner.ops[1][1 - switched] == "cfg"
    for j in range(2):  # each sample follows its own sticky schedule and equals it run alone
        ops = [step[j] for step in runner.ops]
        k = ops.index("cond")
        assert ops == ["cfg"] * k + ["cond"] * (T - k)
        assert runner.nfe[j] == Policy.static(ops, W).nfe
        with apply_policy(pipe, Policy.static(ops, W)):
            alone = _call(pipe, prompts[j], latents=latents[j : j + 1])
        torch.testing.assert_close(both[j : j + 1], alone, rtol=0, atol=1e-4)
    assert counter.rows == runner.nfe.sum()


def test_per_step_thresholds_on_a_pipeline(pipes):
    """A searched rule (one threshold per step) on an unmodified pipeline: each sample stops at
    the first step where its γ reaches that step's threshold, and runs only cond after."""
    pipe = pipes["sd"]
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    prompts = ["a red cube", "a photo of a dog on the beach", "a cat"]
    with apply_policy(pipe, Policy.adaptive(T, W, threshold=1.0)) as runner:  # never stops: the γ of full CFG
        _call(pipe, prompts, latents=latents)
    gammas = torch.stack(runner.gammas).T.double()  # (3, T)
    thresholds = [1.0, float(gammas[:, 1].median()), -1.0, -1.0]  # never at step 0; the median at 1; stop at 2
    with apply_policy(pipe, Policy.adaptive(T, W, thresholds)) as runner, RowCounter(pipe) as counter:
        _call(pipe, prompts, latents=latents)
    stops = [1 if float(g[1]) >= thresholds[1] else 2 for g in gammas]  # the step whose γ crossed
    assert runner.nfe.tolist() == [float(T + s + 1) for s in stops] and len(set(stops)) == 2
    assert counter.rows == runner.nfe.sum()


def test_stop_scales_on_a_pipeline(pipes):
    """The step at which a sample stops runs CFG at the rule's stop scale there (per sample), as
    the sampler does: a rule that stops every sample at step 1 with stop scale s equals the static
    policy cfg, cfg@s, cond, cond."""
    pipe = pipes["sd"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    prompts = ["a red cube", "a cat"]
    rule = Policy.adaptive(T, W, [1.0, -1.0, -1.0, -1.0], stop_scales=[W, 2.5, W, W])
    with apply_policy(pipe, rule) as runner, RowCounter(pipe) as counter:
        stopped = _call(pipe, prompts, latents=latents)
    assert runner.nfe.tolist() == [T + 2.0] * 2 and counter.rows == 2 * (T + 2)
    with apply_policy(pipe, Policy.static(["cfg", {"op": "cfg", "scale": 2.5}, "cond", "cond"], W)):
        static = _call(pipe, prompts, latents=latents)
    torch.testing.assert_close(stopped, static, rtol=0, atol=1e-5)
    with apply_policy(pipe, Policy.adaptive(T, W, [1.0, -1.0, -1.0, -1.0])):
        plain = _call(pipe, prompts, latents=latents)
    assert not torch.allclose(stopped, plain, atol=1e-4)  # the stop scale did change the result


def test_step_count_mismatch_is_refused_unless_resampled(pipes):
    pipe = pipes["sd"]
    policy = Policy.static(["cfg", "cfg", "cond", "cond"], W)
    with apply_policy(pipe, policy), pytest.raises(PolicyError, match="policy has 4 steps but the sampler runs 6"):
        _call(pipe, "a red cube", num_inference_steps=6)
    with apply_policy(pipe, policy, resample=True) as runner:
        _call(pipe, "a red cube", num_inference_steps=6)
    assert [ops[0] for ops in runner.ops] == ["cfg"] * 3 + ["cond"] * 3


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_affine_steps_run_in_the_pipeline_as_in_the_sampler(pipes, name):
    """LinearAG's affine steps under apply_policy: the hook carries the past estimates, so the
    pipeline's latents are agsearch.sample's, and an affine step runs the conditional pass only."""
    from agsearch import sample
    from agsearch.denoisers.text import TextCondition, denoiser_for
    from agsearch.linear_ag import affine_step

    pipe = pipes[name]
    coef = {"eps_c": 1.1, "eps_c_prev": -0.3, "eps_u_prev": 0.25, "x": 0.01, "bias": 0.0}
    # The last affine step follows a cond step, which provides no ε_u: it falls back to cfg (2 passes).
    policy = Policy.static(["cfg", affine_step(coef), "cond", affine_step(coef, fallback="cfg")], W)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, negatives = ["a red cube", "a dog"], ["blurry", ""]
    size = 16 * pipe.vae_scale_factor
    with apply_policy(pipe, policy) as runner, RowCounter(pipe) as counter:
        theirs = pipe(prompts, negative_prompt=negatives, latents=latents.clone(), num_inference_steps=T,
                      guidance_scale=W, output_type="latent", height=size, width=size).images
    ours = sample(denoiser_for(pipe), pipe.scheduler, policy, latents.clone(),
                  TextCondition.from_pipeline(pipe, prompts, negatives))
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=1e-5)
    assert runner.nfe.tolist() == ours.nfe.tolist() == [6.0, 6.0] and counter.rows == 12
    assert runner.ops == [["cfg"] * 2, ["affine"] * 2, ["cond"] * 2, ["affine"] * 2]


def test_pipeline_is_left_as_it_was(pipes, tmp_path):
    pipe = pipes["sd"]
    before = (dict(pipe.unet.__dict__), dict(pipe.scheduler.__dict__))
    policy = Policy.static(["cfg", "cfg", "cond", "cond"], W)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_policy(pipe, policy):
            assert "forward" in pipe.unet.__dict__
            with pytest.raises(ValueError, match="already active"):
                with apply_policy(pipe, policy):
                    pass
            raise RuntimeError("boom")
    with apply_policy(pipe, policy), pytest.raises(PolicyError):
        _call(pipe, "a red cube", num_inference_steps=5)  # fails inside the pipeline call
    after = (dict(pipe.unet.__dict__), dict(pipe.scheduler.__dict__))
    assert "forward" not in pipe.unet.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    assert before[0].keys() == after[0].keys() and before[1].keys() == after[1].keys()
    policy.save(tmp_path / "p.json")  # a policy file works too
    with apply_policy(pipe, tmp_path / "p.json") as runner:
        _call(pipe, "a red cube")
    assert runner.nfe.tolist() == [6.0]


def test_bad_use_is_refused(pipes):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = pipes["sd"]
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.raises(ValueError, match="'StableDiffusionImg2ImgPipeline' is not supported"):
        with apply_policy(img2img, Policy.static(["cfg"] * T, W)):
            pass
    with apply_policy(pipe, Policy.static(["cfg"] * T, W)), pytest.raises(ValueError, match="guidance_scale=1.0"):
        _call(pipe, "a red cube", guidance_scale=1.0)
    with apply_policy(pipe, Policy.static(["cond"] * T, W)) as runner:
        _call(pipe, "a red cube", guidance_scale=1.0)  # no unconditional pass needed
    assert runner.nfe.tolist() == [T]


@pytest.mark.parametrize("name,prediction", [("sd", "epsilon"), ("sd", "v_prediction"),
                                             ("sdxl", "epsilon"), ("sd3", "flow")])
def test_denoiser_adapters_reproduce_the_pipeline(pipes, name, prediction):
    """agsearch's own sampler over the adapters gives the latents the pipeline gives under apply_policy
    (ε, v and flow-matching velocity), for a static policy with a per-step scale and for AG."""
    from agsearch import sample
    from agsearch.denoisers.text import TextCondition, denoiser_for

    pipe = tiny_pipelines.tiny_sd(prediction_type=prediction) if prediction == "v_prediction" else pipes[name]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, negatives = ["a red cube", "a dog"], ["blurry", ""]
    size = 16 * pipe.vae_scale_factor
    cond = TextCondition.from_pipeline(pipe, prompts, negatives, size=size)  # SDXL: its time ids
    for policy in (Policy.static(["cfg", {"op": "cfg", "scale": 3.0}, "cond", "cfg"], W), Policy.adaptive(T, W, 0.0)):
        with apply_policy(pipe, policy) as runner:
            theirs = pipe(prompts, negative_prompt=negatives, latents=latents.clone(), num_inference_steps=T,
                          guidance_scale=W, output_type="latent", height=size, width=size).images
        denoiser = denoiser_for(pipe)
        ours = sample(denoiser, pipe.scheduler, policy, latents.clone(), cond)
        torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=1e-5)
        assert ours.nfe.tolist() == runner.nfe.tolist() and denoiser.evaluations == ours.nfe.sum()
        if policy.kind == "adaptive":
            torch.testing.assert_close(ours.cosine_x0[0], runner.gammas[0])


def test_guidance_rescale_applies_to_the_steps_the_hook_guides(pipes):
    """SD's guidance_rescale (Lin et al. 2023) rescales every guided step, also those the hook
    computes itself (here all of them: the AG rule with θ = 1 guides every step through the hook)."""
    pipe = pipes["sd"]
    plain = _call(pipe, "a red cube", guidance_rescale=0.7)
    with apply_policy(pipe, Policy.adaptive(T, W, 1.0)) as runner:
        ours = _call(pipe, "a red cube", guidance_rescale=0.7)
    assert runner.nfe.tolist() == [2.0 * T]
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    assert not torch.allclose(plain, _call(pipe, "a red cube"))  # the rescale matters here
