"""`ODEOptions`: how `ScorePrior.log_prob` solves the probability-flow ODE, validated once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace

from scoreprior._checks import choice, positive_float, positive_int
from scoreprior.traces import PROBES

__all__ = ["ODEOptions", "merge_deprecated"]

SOLVERS = ("auto", "gaussian", "adaptive")


@dataclass(frozen=True)
class ODEOptions:
    """Options of `ScorePrior.log_prob`, checked on construction (ValueError / TypeError naming the option).

    solver: "gaussian" (the fixed-grid exponential integrator on the prior's Gaussian base,
        `scoreprior.gaussian_flow`: `steps` Runge-Kutta steps, 4 network calls each, gradients by
        backpropagation), "adaptive" (default: torchdiffeq's adaptive `method` at `rtol` / `atol`, the
        reference; with `adjoint` the continuous adjoint) or "auto": "gaussian" when the prior has a Gaussian
        base and `adjoint` is off, else "adaptive". Use "gaussian" / "auto" for typical points of p_t0 (prior
        and posterior draws: blackhole-32, 16 prior draws, 6 steps, 0.09 nats mean error), not for clean images
        such as training or held-out ones: their score changes within a thin layer near t0 that a fixed grid
        misses (held-out crescents: 1640 nats off at 8 steps, 340 at 16; docs/results.md).
    steps: Runge-Kutta steps of the "gaussian" solver.
    divergence: "exact" (the trace of the score Jacobian, about d backward passes per evaluation),
        "hutchinson" (`n_probes` probes per evaluation) or "auto": exact up to EXACT_MAX_DIM = 256 numbers
        per image, Hutchinson above.
    n_probes, probe: Hutchinson probes per evaluation and their law: "rademacher", "gaussian" or "colored"
        (sets of C k^2 probes on the k x k pixel classes, k = 2: n_probes a multiple of 4 C; see
        `scoreprior.traces`). The adaptive solver draws them once per solve (its right-hand side must be
        deterministic); the "gaussian" solver at every evaluation, or once per solve with fresh_probes=False
        (the same probes as the adaptive solver's from the same generator: common random numbers).
    jvp: "difference" (central differences of the score, no autograd) or "autograd" (a VJP per probe).
    rtol, atol, logp_atol, method, adjoint, chunk_size: the adaptive solver's tolerances (of the state
        per step in tau; logp_atol: nats per step of the log-density integral, default atol for the exact
        trace and min(atol d, 0.05) for Hutchinson), torchdiffeq method and adjoint; chunk_size: basis
        vectors per vmap call of the exact trace (both solvers).

    Example:
        >>> options = ODEOptions(solver="gaussian", divergence="hutchinson", n_probes=4, probe="colored", steps=6)
        >>> options.replace(steps=8).steps
        8
    """

    solver: str = "adaptive"
    steps: int = 8
    divergence: str = "auto"
    n_probes: int = 1
    probe: str = "rademacher"
    fresh_probes: bool = True
    jvp: str = "difference"
    rtol: float = 1e-5
    atol: float = 1e-5
    logp_atol: float | None = None
    method: str = "dopri5"
    adjoint: bool = False
    chunk_size: int | None = None

    def __post_init__(self):
        checked = {
            "solver": choice(self.solver, "solver", SOLVERS),
            "steps": positive_int(self.steps, "steps"),
            "divergence": choice(self.divergence, "divergence", ("auto", "exact", "hutchinson")),
            "n_probes": positive_int(self.n_probes, "n_probes"),
            "probe": choice(self.probe, "probe", PROBES),
            "jvp": choice(self.jvp, "jvp", ("difference", "autograd")),
            "rtol": positive_float(self.rtol, "rtol"),
            "atol": positive_float(self.atol, "atol"),
            "logp_atol": None if self.logp_atol is None else positive_float(self.logp_atol, "logp_atol"),
            "chunk_size": None if self.chunk_size is None else positive_int(self.chunk_size, "chunk_size"),
        }
        if not isinstance(self.method, str):
            raise TypeError(f"method: expected a torchdiffeq method name, got {type(self.method).__name__}")
        for name in ("adjoint", "fresh_probes"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if checked["solver"] == "gaussian" and self.adjoint:
            raise ValueError("adjoint: the 'gaussian' solver differentiates by backpropagation through its fixed "
                             "grid; the adjoint applies to solver='adaptive'")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> ODEOptions:
        """A copy with `changes` (validated again)."""
        return replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, e.g. to tell them from other keyword arguments."""
        return tuple(f.name for f in fields(cls))


def merge_deprecated(options: ODEOptions | None, deprecated: dict, *, stacklevel: int = 2,
                     where: str = "log_prob") -> ODEOptions:
    """`options` (default ODEOptions()) updated with solver options given the old way, with a DeprecationWarning
    that shows the new call; TypeError for unknown keys.

    stacklevel: of the warning as `warnings.warn` counts it from the function that calls this one (2: its
    caller); where: "log_prob" (keyword arguments of `ScorePrior.log_prob`) or "log_prob_kwargs" (a dict of
    them passed through, as `importance_draws` takes).
    """
    if options is not None and not isinstance(options, ODEOptions):
        raise TypeError(f"options: expected a scoreprior.ODEOptions, got {type(options).__name__}")
    options = options or ODEOptions()
    if not deprecated:
        return options
    unknown = sorted(set(deprecated) - set(ODEOptions.names()))
    if unknown:
        raise TypeError(f"log_prob() got unexpected keyword arguments {unknown}; solver options go in "
                        f"ODEOptions({', '.join(ODEOptions.names())})")
    call = ", ".join(f"{key}={value!r}" for key, value in deprecated.items())
    if where == "log_prob":
        old, new = f"log_prob(x, {call})", f"log_prob(x, ODEOptions({call}))"
    else:
        old, new = f"{where}={deprecated!r}", f"{where}={{'options': ODEOptions({call})}}"
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel + 1)
    return options.replace(**deprecated)
