"""CLIP score, CLIP-space Fréchet distance and teacher MSE/PSNR, on a random-weight tiny open-clip model."""

import math

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("torchmetrics")

from agsearch.eval.clip import ClipScorer, mse_psnr  # noqa: E402


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A tiny CLIP with random weights saved as safetensors, loaded back through ClipScorer.load
    (the path a user's real weights take)."""
    from agsearch.testing import TINY_CLIP_NAME, tiny_clip_weights

    return ClipScorer.load(TINY_CLIP_NAME, tiny_clip_weights(tmp_path_factory.mktemp("clip")))


def test_clip_score(scorer):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "a dog", "a red cube"]
    scores = scorer.score(images, prompts)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 100)).all())
    torch.testing.assert_close(scorer.score(images[2:], prompts[2:]), scores[2:])  # per image, batch-independent
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.score(images, prompts[:2])


def test_clip_frechet_distance(scorer):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(40, 3, 32, 32, generator=g), torch.rand(40, 3, 32, 32, generator=g) * 0.3
    same = scorer.frechet_distance(a, a)
    assert abs(same) < 1e-2 and scorer.frechet_distance(a, b) > 10 * max(same, 1e-3)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ClipScorer.load("ViT-B-32", tmp_path / "nope.safetensors")


def test_mse_psnr():
    ref = torch.zeros(2, 3, 4, 4)
    mse, psnr = mse_psnr(torch.stack([ref[0] + 0.1, ref[1]]), ref)
    torch.testing.assert_close(mse, torch.tensor([0.01, 0.0]))
    assert psnr[0] == pytest.approx(20.0) and psnr[1] == math.inf
