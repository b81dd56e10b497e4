"""agsearch: make classifier-free guidance cheap.

Search per-step guidance policies, export them as JSON, apply them at inference and evaluate
them side by side. See README.md and DESIGN notes in the repository.
"""

from agsearch.diffusers.hook import apply_policy
from agsearch.guidance.sampler import SampleOutput, sample
from agsearch.policy import Policy, PolicyError

__version__ = "0.1.0"
__all__ = ["apply_policy", "Policy", "PolicyError", "sample", "SampleOutput", "__version__"]
