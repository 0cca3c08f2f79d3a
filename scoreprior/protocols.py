"""The contracts shared by priors and likelihoods: what `DPI.fit`, `check_posterior` and `dps` rely on.

A prior is a log-density log p(x) over images x (B, *event_shape), in nats: `ScorePrior` (probability-flow
ODE), `SurrogatePrior` (its ELBO) and `GaussianPrior` (closed form) are priors. A likelihood is
log p(y | x) of one fixed measurement y: `GaussianLikelihood` (linear A, Gaussian noise) and
`ClosureLikelihood` (closure phases and amplitudes) are likelihoods. Both contracts are structural
(`typing.Protocol`): any object with these members is one, and `isinstance(obj, Prior)` checks that it
has them (names only, not signatures).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Likelihood", "Prior"]


@runtime_checkable
class Prior(Protocol):
    """A prior density p(x) on images, differentiable in x.

    event_shape: shape of one image, e.g. (C, H, W); None when the prior does not know it (a score model
        without `event_shape`), and then its input is not checked against one.
    """

    event_shape: torch.Size | None

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats. x: (B, *event_shape) -> (B,).

        Implementations may take keyword options (a `ScorePrior`'s solver settings, a `generator` for the
        randomness of an estimate); consumers pass them through (`DPI.fit(prior_kwargs=...)`).
        """


@runtime_checkable
class Likelihood(Protocol):
    """The likelihood p(y | x) of one measurement y, as a function of the image x.

    Samplers that follow a misfit need one more member, `residual(x) -> (B, ...)`, zero for a perfect fit
    (`dps`: for a `GaussianLikelihood` r = y - A x, for a `ClosureLikelihood` the noise-whitened closure
    misfit with ||r||^2 = -2 log p + const); both classes have it, and `dps` checks for it.
    """

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(y | x) in nats, differentiable in x. x: (B, C, H, W) real -> (B,)."""

    def validate(self, image_shape: tuple[int, ...]) -> None:
        """Raise ValueError when y does not fit images of shape image_shape = (C, H, W)."""
