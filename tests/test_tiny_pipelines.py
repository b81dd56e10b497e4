"""The tiny transformer pipelines of ``agsearch.testing`` (PixArt-Σ, Sana, Wan 2.1/2.2, Flux,
Qwen-Image): built offline, seeded, and calling their denoiser(s) in the pattern their docstrings
state: batched ``[uncond; cond]`` or two calls (cond, then uncond) per step, one scheduler step each."""

import socket
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from agsearch import testing as tiny_pipelines  # noqa: E402

T = 3
PROMPT, NEGATIVE = "a red circle", "blurry"

# Per pipeline: call arguments that keep it small, the argument that turns guidance on (and its
# value), the CFG layout (one batched call, or two calls per step) and the denoiser of each step.
CASES = {
    "pixart_sigma": dict(
        call=dict(height=16, width=16, use_resolution_binning=False, clean_caption=False, max_sequence_length=16),
        guidance=("guidance_scale", 4.5), cfg="batched", experts=["transformer"] * T),
    "sana": dict(
        call=dict(height=32, width=32, use_resolution_binning=False, complex_human_instruction=None,
                  max_sequence_length=16),
        guidance=("guidance_scale", 4.5), cfg="batched", experts=["transformer"] * T),
    "wan": dict(
        call=dict(height=32, width=32, num_frames=5, max_sequence_length=16),
        guidance=("guidance_scale", 5.0), cfg="two calls", experts=["transformer"] * T),
    "wan22": dict(
        call=dict(height=32, width=32, num_frames=5, max_sequence_length=16),
        guidance=("guidance_scale", 5.0), cfg="two calls", experts=["transformer", "transformer_2", "transformer_2"]),
    "flux": dict(
        call=dict(height=16, width=16, max_sequence_length=16),
        guidance=("true_cfg_scale", 4.0), cfg="two calls", experts=["transformer"] * T),
    "qwen_image": dict(
        call=dict(height=32, width=32, max_sequence_length=16),
        guidance=("true_cfg_scale", 4.0), cfg="two calls", experts=["transformer"] * T),
}


def _refuse(*args, **kwargs):
    raise OSError(f"network access while building a tiny pipeline: {args}")


@contextmanager
def _offline():
    """Hub offline, and name lookups and socket connections refused: building needs no network.
    (huggingface_hub reads ``HF_HUB_OFFLINE`` when imported, so the socket guard is what enforces it.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket, "getaddrinfo", _refuse)
        mp.setattr(socket.socket, "connect", _refuse)
        yield


class _Pipes(dict):
    """Each tiny pipeline built (offline) on first use, once per test module."""

    def __missing__(self, name):
        with _offline():
            self[name] = getattr(tiny_pipelines, f"tiny_{name}")()
        return self[name]


@pytest.fixture(scope="module")
def pipes():
    return _Pipes()


def _call(pipe, name, guided=True, seed=0, **kwargs):
    case = CASES[name]
    key, scale = case["guidance"]
    kwargs = {**case["call"], key: scale if guided else 1.0, **kwargs}
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=T, output_type="pt", return_dict=False,
                generator=torch.Generator().manual_seed(seed), **kwargs)[0]


class CallRecorder:
    """Records, step by step, each denoiser call (which attribute, rows, text embeddings) between
    ``scheduler.step`` calls. ``steps[i]`` is the list of calls before the i-th scheduler step."""

    def __init__(self, pipe):
        self.steps, self._calls, self.scheduler = [], [], pipe.scheduler
        self.handles = [getattr(pipe, attr).register_forward_pre_hook(self._hook(attr), with_kwargs=True)
                        for attr in ("transformer", "transformer_2") if getattr(pipe, attr, None) is not None]
        step = type(self.scheduler).step

        def counting_step(*args, **kwargs):
            self.steps.append(self._calls)
            self._calls = []
            return step(self.scheduler, *args, **kwargs)

        self.scheduler.step = counting_step  # an instance attribute, deleted on exit

    def _hook(self, attr):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # PixArt and Sana pass the latents positionally
            self._calls.append((attr, x.shape[0], kwargs["encoder_hidden_states"]))
        return hook

    def pattern(self):
        return [[(attr, rows) for attr, rows, _ in calls] for calls in self.steps]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        del self.scheduler.step
        assert not self._calls, f"denoiser calls after the last scheduler step: {len(self._calls)}"


@pytest.mark.parametrize("name", CASES)
def test_builds_offline_on_cpu_in_float32(pipes, name):
    pipe = pipes[name]
    for attr in ("transformer", "transformer_2", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, attr, None)
        if module is not None:
            assert module.device.type == "cpu" and module.dtype == torch.float32, (attr, module.device, module.dtype)


@pytest.mark.parametrize("name", CASES)
def test_same_seed_same_output(pipes, name):
    pipe = pipes[name]
    first = _call(pipe, name)
    assert torch.isfinite(first).all()
    assert torch.equal(first, _call(pipe, name))
    assert not torch.equal(first, _call(pipe, name, seed=1))


@pytest.mark.parametrize("name", CASES)
def test_rebuilding_with_the_same_seed_gives_the_same_pipeline(pipes, name):
    with _offline():
        again = getattr(tiny_pipelines, f"tiny_{name}")(seed=0)
    assert torch.equal(_call(pipes[name], name), _call(again, name))


@pytest.mark.parametrize("name", CASES)
def test_denoiser_calls_per_step_match_the_docstring(pipes, name):
    pipe, case = pipes[name], CASES[name]
    with CallRecorder(pipe) as unguided:
        _call(pipe, name, guided=False)
    with CallRecorder(pipe) as guided:
        _call(pipe, name, guided=True)

    # Without guidance: one call per step on the step's expert, B rows, one scheduler step.
    assert unguided.pattern() == [[(expert, 1)] for expert in case["experts"]]
    if case["cfg"] == "batched":
        assert guided.pattern() == [[(expert, 2)] for expert in case["experts"]]
    else:
        assert guided.pattern() == [[(expert, 1), (expert, 1)] for expert in case["experts"]]

    # Which half is cond: the unguided call's text embeddings are the cond ones.
    for [(_, _, cond)], calls in zip(unguided.steps, guided.steps):
        if case["cfg"] == "batched":  # rows [uncond; cond]
            [(_, _, text)] = calls
            assert torch.equal(text[1:], cond) and not torch.equal(text[:1], cond)
        else:  # cond first, then uncond
            (_, _, first), (_, _, second) = calls
            assert torch.equal(first, cond) and not torch.equal(second, cond)


def test_wan22_low_noise_steps_keep_two_calls_when_guidance_scale_2_is_1(pipes):
    """Wan's CFG switch is ``guidance_scale > 1`` alone: ``guidance_scale_2=1`` still runs the uncond
    call on ``transformer_2``'s steps (weight 1 gives the cond prediction back)."""
    pipe = pipes["wan22"]
    with CallRecorder(pipe) as calls:
        _call(pipe, "wan22", guidance_scale_2=1.0)
    assert calls.pattern() == [[("transformer", 1)] * 2] + [[("transformer_2", 1)] * 2] * 2


def test_qwen_image_template_prefix_is_the_dropped_prefix(pipes):
    """Qwen-Image drops the first ``prompt_template_encode_start_idx`` (34) hidden states: the
    template's system prefix, which the trained tokenizer must split into exactly that many tokens."""
    pipe = pipes["qwen_image"]
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    embeds, mask = pipe.encode_prompt(PROMPT, max_sequence_length=16)
    assert embeds.shape[1] == len(pipe.tokenizer(pipe.prompt_template_encode.format(PROMPT)).input_ids) - 34


@pytest.mark.parametrize("builder, expected", [("sdxl_sized", 2_567_463_684), ("wan_1_3b_sized", 1_418_996_800)])
def test_gpu_sized_pipelines_have_the_released_denoiser_sizes(builder, expected):
    """experiments/gpu_speed.sh times these: SDXL-base-1.0's UNet (2.57B parameters) and Wan 2.1
    T2V-1.3B's transformer (1.42B), built on the meta device (no memory, no init)."""
    from agsearch import testing

    pipe = getattr(testing, builder)(device="meta")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert sum(p.numel() for p in denoiser.parameters()) == expected
