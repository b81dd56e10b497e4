import pytest
import torch

from agsearch.denoisers.class_conditional import ClassConditionalDenoiser
from agsearch.diffusers.schedulers import make_scheduler
from agsearch.models.digits import SCHEDULER_CONFIG
from agsearch.models.digits.data import NULL_CLASS


@pytest.fixture(scope="session")
def random_unet():
    """A tiny class-conditional UNet2DModel with seeded random weights: the tests of the loop's
    mechanics do not depend on the trained weights, and run fast."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
        num_class_embeds=NULL_CLASS + 1,
    ).requires_grad_(False).eval()


@pytest.fixture
def denoiser(random_unet):
    return ClassConditionalDenoiser(random_unet, NULL_CLASS)


@pytest.fixture(params=["ddim", "euler", "dpm++"])
def scheduler(request):
    return make_scheduler(request.param, SCHEDULER_CONFIG)


class TinyPipes(dict):
    """Each tiny diffusers pipeline of agsearch.testing (``tiny_<name>``) built on first use."""

    def __missing__(self, name):
        from agsearch import testing

        self[name] = getattr(testing, f"tiny_{name}")()
        return self[name]


@pytest.fixture(scope="module")
def pipes():
    """Tiny pipelines by name, built once per test module: ``pipes["sd"]``, ``pipes["wan"]``, ..."""
    return TinyPipes()
