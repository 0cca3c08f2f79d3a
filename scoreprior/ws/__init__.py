"""Whitened-score (WS) diffusion with structured noise (Alido, Li, Sun & Tian, arXiv 2505.10311).

Forward process (VP drift, structured noise):
    dx = -beta(t) x / 2 dt + sqrt(beta(t)) K dw,   x_t = a(t) x_0 + s(t) K z,   z ~ N(0, I),
with a(t), s(t) those of `VPSDE` and K a real, symmetric, circulant filter per channel:
    K = F^H diag(kappa) F,   F the unitary 2-D DFT over (H, W),
given by its spectrum kappa: (H, W), real, >= 0, on the torch.fft.fft2 grid (zero frequency at [0, 0])
and Hermitian-symmetric, kappa[p, q] = kappa[-p mod H, -q mod W] (the grid of `FourierDiagonalCovariance`).
The noise covariance of x_t | x_0 is s(t)^2 K K^T = s(t)^2 F^H diag(kappa^2) F.

Whitened score: n(x, t) = G_t G_t^T grad log p_t(x) = beta(t) K K^T grad log p_t(x), G_t = sqrt(beta) K.
The conditional one needs no inverse:
    beta K K^T grad log p(x_t | x_0) = -beta K K^T (s^2 K K^T)^{-1} (x_t - a x_0) = -beta K z / s.
The sign is minus; the released code of the paper trains on +beta K z / s.
Reverse-time dynamics use n directly (no K^{-1}):
    probability flow  dx = [-beta x / 2 - n / 2] dt,   reverse SDE  dx = [-beta x / 2 - n] dt + sqrt(beta) K dw.
"""


from scoreprior.ws.models import WhitenedScore, WidthConditionedNet, build_ws_net, load_ws_model, ws_loss
from scoreprior.ws.process import (
    GaussianWhitenedScore, WSProcess, gaussian_spectrum, mix_white, power_law_spectrum, spectrum_from_recipe,
)
from scoreprior.ws.sampling import AutoLambda, Haze, choose_lambda, power_spectrum, sweep_lambda, ws_sample

__all__ = [
    "gaussian_spectrum", "power_law_spectrum", "mix_white", "spectrum_from_recipe",
    "WSProcess", "GaussianWhitenedScore", "WhitenedScore", "WidthConditionedNet", "build_ws_net",
    "load_ws_model", "ws_loss", "Haze", "power_spectrum", "AutoLambda", "ws_sample", "sweep_lambda", "choose_lambda",
]
