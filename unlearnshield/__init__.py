"""UnlearnShield: defend machine-unlearning releases against unlearning-inversion attacks.

Releasing an unlearned model θu next to the original θo exposes the parameter difference
Δ = θu − θo, which carries the gradient of the deleted sample; an unlearning-inversion
attack reconstructs the sample from it. UnlearnShield perturbs the release, θu' = θu + δ,
so that Δ* = Δ + δ points elsewhere in cosine space while accuracy and forgetting stay.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from unlearnshield.defenses import protect  # noqa: E402  (needs __version__ defined above)

__all__ = ["__version__", "protect"]
