"""apply_policy on the transformer pipelines: PixArt-Σ and Sana (one batched CFG call per step),
Wan 2.1/2.2, Flux with true CFG and Qwen-Image (a conditional then an unconditional call per step),
all tiny and built offline (agsearch.testing)."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from agsearch import Policy, PolicyError, apply_policy  # noqa: E402
from agsearch import testing as tiny_pipelines  # noqa: E402
from agsearch.linear_ag import affine_step  # noqa: E402

T = 3
W = 4.0
NAMES = ["pixart_sigma", "sana", "wan", "wan22", "flux", "qwen_image"]
TWO_CALLS = {"wan", "wan22", "flux", "qwen_image"}
FIRST_LAYER = {"pixart_sigma": "pos_embed", "sana": "patch_embed", "wan": "patch_embedding",
               "wan22": "patch_embedding", "flux": "x_embedder", "qwen_image": "img_in"}
PROMPTS, NEGATIVES = ["a red circle", "a blue square"], ["blurry", "low quality"]


def call(pipe, name, prompts=PROMPTS, negatives=NEGATIVES, scale=W, seed=0, steps=T, **extra):
    """The pipeline's latents for ``prompts``, guided at ``scale`` (None: no guidance); sample j's
    noise comes from seed ``seed + j``, so a sample drawn alone gets the noise it had in a batch."""
    kwargs = dict(num_inference_steps=steps, output_type="latent", max_sequence_length=16,
                  generator=[torch.Generator().manual_seed(seed + j) for j in range(len(prompts))])
    if name in ("flux", "qwen_image"):  # true CFG needs a negative prompt and true_cfg_scale > 1
        kwargs.update(true_cfg_scale=scale or 1.0, height=16 if name == "flux" else 32, width=16 if name == "flux" else 32)
    else:
        kwargs.update(guidance_scale=scale or 1.0)
    if name == "pixart_sigma":
        kwargs.update(height=16, width=16, use_resolution_binning=False, clean_caption=False)
    elif name == "sana":
        kwargs.update(height=32, width=32, use_resolution_binning=False, complex_human_instruction=None)
    elif name in ("wan", "wan22"):
        kwargs.update(height=32, width=32, num_frames=5)
    if negatives is not None:
        kwargs["negative_prompt"] = negatives
    out = pipe(prompts, **{**kwargs, **extra})
    return out.frames if hasattr(out, "frames") else out.images


def denoisers(pipe):
    return [d for d in (pipe.transformer, getattr(pipe, "transformer_2", None)) if d is not None]


class RowCounter:
    """Rows that reach the first layer of the pipeline's denoiser(s)."""

    def __init__(self, pipe, name):
        self.rows = 0
        self.handles = [getattr(d, FIRST_LAYER[name]).register_forward_pre_hook(self._hook) for d in denoisers(pipe)]

    def _hook(self, module, args):
        self.rows += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", NAMES)
def test_full_cfg_policy_gives_the_plain_call(pipes, name):
    pipe = pipes[name]
    plain = call(pipe, name)
    with apply_policy(pipe, Policy.static(["cfg"] * T, W)) as runner, RowCounter(pipe, name) as counter:
        ours = call(pipe, name)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)
    assert runner.nfe.tolist() == [2.0 * T] * 2 and counter.rows == 4 * T


@pytest.mark.parametrize("name", NAMES)
def test_rows_reaching_the_first_layer_equal_the_policy_nfe(pipes, name):
    pipe = pipes[name]
    policy = Policy.static(["cfg", {"op": "cfg", "scale": 2.0}, "cond"], W)
    with apply_policy(pipe, policy) as runner, RowCounter(pipe, name) as counter:
        call(pipe, name)
    assert runner.nfe.tolist() == [5.0, 5.0] and counter.rows == 10 == runner.forward_rows


@pytest.mark.parametrize("name", NAMES)
def test_cond_steps_ignore_the_negative_prompt_and_match_the_unguided_call(pipes, name):
    pipe = pipes[name]
    unguided = call(pipe, name, scale=None, negatives=None)
    with apply_policy(pipe, Policy.static(["cond"] * T, W)) as runner:
        a = call(pipe, name)
        b = call(pipe, name, negatives=["a green triangle", "a photo of a dog"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the unconditional pass never ran
    torch.testing.assert_close(a, unguided, rtol=0, atol=1e-6)
    assert runner.nfe.tolist() == [T, T]
    with apply_policy(pipe, Policy.static(["cfg"] + ["cond"] * (T - 1), W)):
        c = call(pipe, name)
        d = call(pipe, name, negatives=["a green triangle", "a photo of a dog"])
    assert not torch.allclose(c, d)  # ... but it matters on the cfg step


@pytest.mark.parametrize("name", NAMES)
def test_per_step_scales_are_the_policys_whatever_the_calls_scale(pipes, name):
    pipe = pipes[name]
    plain = call(pipe, name, scale=2.0)
    with apply_policy(pipe, Policy.static([{"op": "cfg", "scale": 2.0}] * T, W)):
        ours = call(pipe, name, scale=W)
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)


def test_a_cutoff_on_wan_matches_a_guidance_scale_callback(pipes):
    """diffusers has no CFG-cutoff callback for Wan; setting its guidance scale to 1 after step k
    (what SD's SDCFGCutoffCallback does) makes the pipeline skip the unconditional call itself."""
    pipe = pipes["wan"]

    def cutoff(p, i, t, kwargs):
        if i == 0:
            p._guidance_scale = 1.0
        return kwargs

    theirs = call(pipe, "wan", callback_on_step_end=cutoff)
    with apply_policy(pipe, Policy.static(["cfg"] + ["cond"] * (T - 1), W)):
        ours = call(pipe, "wan")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_wan22_runs_both_experts_and_its_second_scale_is_the_policys(pipes):
    pipe = pipes["wan22"]
    plain = call(pipe, "wan22", guidance_scale_2=2.0)  # steps 1 and 2 run transformer_2
    policy = Policy.static(["cfg", {"op": "cfg", "scale": 2.0}, {"op": "cfg", "scale": 2.0}], W)
    with apply_policy(pipe, policy) as runner, RowCounter(pipe, "wan22") as counter:
        ours = call(pipe, "wan22")
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    assert counter.rows == 12 and runner.nfe.tolist() == [6.0, 6.0]


@pytest.mark.parametrize("name", ["pixart_sigma", "wan", "flux", "qwen_image"])
def test_adaptive_guidance_per_sample_equals_each_samples_static_ops(pipes, name):
    """AG stops each sample on its own; each sample's latents are those of the static policy of the
    ops it ran, sampled alone."""
    pipe = pipes[name]
    with apply_policy(pipe, Policy.adaptive(T, W, 1.0)) as probe:  # θ = 1 never stops: γ of every step
        call(pipe, name)
    gammas = torch.stack(probe.gammas)  # (T, 2)
    threshold = float(gammas[0].max()) if name != "qwen_image" else float(gammas[0].min())
    with apply_policy(pipe, Policy.adaptive(T, W, threshold)) as runner, RowCounter(pipe, name) as counter:
        both = call(pipe, name)
    assert counter.rows == runner.nfe.sum() and runner.nfe.sum() < 4 * T  # someone stopped guiding
    for j in range(2):
        ops = [step[j] for step in runner.ops]
        with apply_policy(pipe, Policy.static(ops, W)):
            alone = call(pipe, name, prompts=PROMPTS[j:j + 1], negatives=NEGATIVES[j:j + 1], seed=j)
        # Rows run in other batch shapes: float noise of the kernels, not of the op (a wrong op is O(0.1)).
        torch.testing.assert_close(both[j:j + 1], alone, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["sana", "wan", "flux", "qwen_image"])
def test_affine_steps_run_with_the_carried_estimates(pipes, name):
    pipe = pipes[name]
    same = {"eps_c": 1.0, "eps_c_prev": 0.0, "eps_u_prev": 0.0, "x": 0.0, "bias": 0.0}  # ε̂_u = ε_c: cond
    with apply_policy(pipe, Policy.static(["cfg", affine_step(same), "cond"], W)) as runner, \
            RowCounter(pipe, name) as counter:
        ours = call(pipe, name)
    with apply_policy(pipe, Policy.static(["cfg", "cond", "cond"], W)):
        theirs = call(pipe, name)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert runner.nfe.tolist() == [4.0, 4.0] and counter.rows == 8
    past = {"eps_c": 1.0, "eps_c_prev": 0.0, "eps_u_prev": 1.0, "x": 0.0, "bias": 0.0}  # ε̂_u = ε_c + ε_u(t−1)
    with apply_policy(pipe, Policy.static(["cfg", affine_step(past), affine_step(past, fallback="cfg")], W)) as runner:
        uses_past = call(pipe, name)
    assert runner.nfe.tolist() == [4.0, 4.0] and not torch.allclose(uses_past, theirs)


def test_affine_steps_on_a_variance_predicting_denoiser_are_refused(pipes):
    coef = {"eps_c": 1.0, "eps_c_prev": 0.0, "eps_u_prev": 0.0, "x": 0.0, "bias": 0.0}
    with apply_policy(pipes["pixart_sigma"], Policy.static(["cfg", affine_step(coef), "cond"], W)), \
            pytest.raises(ValueError, match="8 channels for 4"):
        call(pipes["pixart_sigma"], "pixart_sigma")


@pytest.mark.parametrize("name", sorted(TWO_CALLS))
def test_two_call_pipelines_refuse_what_they_cannot_honour(pipes, name):
    pipe = pipes[name]
    with pytest.raises(ValueError, match="uncond steps cannot run"):
        with apply_policy(pipe, Policy.static(["cfg", "uncond", "cond"], W)):
            pass
    with apply_policy(pipe, Policy.static(["cfg"] * T, W)), pytest.raises(ValueError, match="no unconditional call"):
        call(pipe, name, scale=None)  # the call builds no unconditional inputs
    assert all("forward" not in d.__dict__ for d in denoisers(pipe))


@pytest.mark.parametrize("name", NAMES)
def test_the_pipeline_is_restored_also_after_an_exception(pipes, name):
    pipe = pipes[name]
    keys = ([set(d.__dict__) for d in denoisers(pipe)], set(pipe.scheduler.__dict__), set(pipe.__dict__))
    with apply_policy(pipe, Policy.static(["cfg"] * T, W)), pytest.raises(PolicyError, match="runs 4"):
        call(pipe, name, steps=4)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_policy(pipe, Policy.static(["cfg"] * T, W)):
            raise RuntimeError("boom")
    assert ([set(d.__dict__) for d in denoisers(pipe)], set(pipe.scheduler.__dict__), set(pipe.__dict__)) == keys
    with apply_policy(pipe, Policy.static(["cfg"] * T, W)) as runner:
        call(pipe, name)
    assert runner.nfe.tolist() == [2.0 * T] * 2


@pytest.mark.parametrize("name", ["wan", "wan22"])
def test_the_wan_adapter_reproduces_the_pipeline(pipes, name):
    """agsearch's sampler over the search's Wan adapter gives the pipeline's latents under
    apply_policy (Wan 2.2: the expert of each step chosen at the pipeline's boundary)."""
    from agsearch import sample
    from agsearch.denoisers.text import TextCondition, denoiser_for

    pipe = pipes[name]
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    policy = Policy.static(["cfg", {"op": "cfg", "scale": 2.0}, "cond"], W)
    with apply_policy(pipe, policy):
        theirs = pipe(PROMPTS, negative_prompt=NEGATIVES, latents=latents.clone(), num_inference_steps=T,
                      guidance_scale=W, height=32, width=32, num_frames=5, output_type="latent").frames
    denoiser = denoiser_for(pipe)
    ours = sample(denoiser, pipe.scheduler, policy, latents.clone(), TextCondition.from_pipeline(pipe, PROMPTS, NEGATIVES))
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=1e-5)
    assert denoiser.evaluations == 10


def test_a_cutoff_on_wan_matches_diffusers_own_guider_interval(pipes):
    """diffusers' ClassifierFreeGuidance(start, stop) in the modular Wan pipeline guides the first
    steps only: the same cutoff under apply_policy on the standard pipeline gives its latents."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanBlocks

    pipe = pipes["wan"]
    args = dict(prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], num_inference_steps=4, height=32, width=32,
                num_frames=5, max_sequence_length=16)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    modular = WanBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if v is not None},
                              guider=ClassifierFreeGuidance(guidance_scale=W, start=0.0, stop=0.5))
    modular.set_progress_bar_config(disable=True)
    theirs = modular(**args, latents=latents.clone(), output="latents")
    with apply_policy(pipe, Policy.static(["cfg", "cfg", "cond", "cond"], W)) as runner:
        ours = pipe(**args, guidance_scale=W, latents=latents.clone(), output_type="latent").frames
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert runner.nfe.tolist() == [6.0]
