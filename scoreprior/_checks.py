"""The argument validators every public entry point uses: one rule and one message style each.

Each validator returns the value in its plain Python type (int, float, str, tuple, list; a detached
tensor from `real_tensor`) and raises with the message "{name}: expected ..., got {value!r}", naming the
argument, what it accepts and what it got (a tensor's or array's type or dtype, not its values):
- TypeError for a value of the wrong type: a bool anywhere (True is not a count or a scale), a float or
  str where an integer is expected, a str or tensor where a number is expected;
- ValueError for a value of the right type outside its range: 0, a negative, inf or NaN where the
  argument must be positive, an option that is not among the choices, an (H, W) of the wrong length.
An object that lacks a member of the contract it is passed as (`implements`) is a TypeError too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "batch_shape",
    "choice",
    "format_shape",
    "height_width",
    "implements",
    "integer",
    "nonnegative_int",
    "number",
    "number_list",
    "positive_float",
    "positive_int",
    "probability",
    "real_tensor",
    "sampler_options",
]


def format_shape(shape: Sequence[int | str]) -> str:
    """("B", 1, 8, 8) -> "(B, 1, 8, 8)"."""
    return "(" + ", ".join(str(e) for e in shape) + ")"


def _show(bound: float) -> str:
    """A bound as written in a message: 0 -> "0", 24.0 -> "24", 0.001 -> "0.001", inf -> "inf"."""
    bound = float(bound)
    return str(int(bound)) if bound.is_integer() else repr(bound)


def _wrong_type(value: object, name: str, expected: str) -> TypeError:
    return TypeError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")


def integer(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (numbers.Integral, not bool) with low <= value <= high (None: no bound), returned as int."""
    if low is not None and high is not None:
        expected = f"an integer in [{low}, {high}]"
    elif low is not None or high is not None:
        expected = f"an integer >= {low}" if high is None else f"an integer <= {high}"
    else:
        expected = "an integer"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _wrong_type(value, name, expected)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return int(value)


def positive_int(value: object, name: str) -> int:
    """An integer >= 1 (a count, a size, a number of steps), returned as int."""
    return integer(value, name, low=1)


def nonnegative_int(value: object, name: str) -> int:
    """An integer >= 0 (a count that may be zero), returned as int."""
    return integer(value, name, low=0)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """The words for a finite real between low and high, e.g. "a finite positive number", "a number in [0, 1)"."""
    if high == math.inf:
        if low == -math.inf:
            return "a finite number"
        if low == 0 and low_open:
            return "a finite positive number"
        return f"a finite number {'>' if low_open else '>='} {_show(low)}"
    if low == -math.inf:
        return f"a finite number {'<' if high_open else '<='} {_show(high)}"
    return f"a number in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"


def number(value: object, name: str, *, low: float, high: float = math.inf, low_open: bool = True,
           high_open: bool = False) -> float:
    """A finite real (numbers.Real, not bool) between low and high, returned as float.

    low_open / high_open: exclude the bound itself (low < value, value < high) instead of including it;
    low = -inf or high = inf leaves that side unbounded (the value is still finite).
    """
    expected = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _wrong_type(value, name, expected)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def positive_float(value: object, name: str) -> float:
    """A finite real > 0 (a scale, a tolerance, a rate), returned as float."""
    return number(value, name, low=0.0)


def probability(value: object, name: str) -> float:
    """A real in the open interval (0, 1) (a credible level, a tail probability), returned as float."""
    return number(value, name, low=0.0, high=1.0, high_open=True)


def choice(value: object, name: str, options: Sequence[str]) -> str:
    """One of the strings `options`; the message lists them all."""
    quoted = [repr(option) for option in options]
    expected = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    if not isinstance(value, str):
        raise _wrong_type(value, name, expected)
    if value not in options:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def number_list(values: object, name: str) -> list[object]:
    """One number, or a sequence / array / tensor of them flattened, as a non-empty list; the caller checks
    each value (e.g. `probability`, `positive_float`)."""
    items = [values] if isinstance(values, Real) else list(torch.as_tensor(values).reshape(-1).tolist())
    if not items:
        raise ValueError(f"{name}: expected at least one value, got none")
    return items


def real_tensor(x: object, name: str) -> Tensor:
    """x as a real floating-point tensor, detached (numpy arrays converted, sharing memory)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")
    return x.detach()


def height_width(value: object, name: str) -> tuple[int, int]:
    """(H, W): a tuple or list (a torch.Size too) of two integers >= 1, returned as a tuple of ints."""
    expected = "(H, W) with integers H, W >= 1"
    if not isinstance(value, (tuple, list)):
        raise _wrong_type(value, name, expected)
    if len(value) != 2:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return positive_int(value[0], f"{name}[0]"), positive_int(value[1], f"{name}[1]")


def implements(value: object, name: str, protocol: type) -> None:
    """TypeError unless value has every member of the typing.Protocol `protocol`: its annotated attributes
    and its methods (callable there); the message names the members value lacks."""
    attributes = list(vars(protocol).get("__annotations__", {}))
    methods = [key for key, member in vars(protocol).items() if callable(member) and not key.startswith("_")]
    missing = [key for key in attributes if not hasattr(value, key)]
    missing += [key for key in methods if not callable(getattr(value, key, None))]
    if missing:
        raise TypeError(f"{name}: expected a {protocol.__module__}.{protocol.__name__} with "
                        f"{', '.join(attributes + methods)}, got {type(value).__name__} without {', '.join(missing)}")


def batch_shape(x: object, name: str, event_shape: Sequence[int]) -> None:
    """ValueError unless x (a tensor or array) has shape (B, *event_shape) for some batch size B."""
    shape = tuple(x.shape)
    if len(shape) < 1 or shape[1:] != tuple(event_shape):
        raise ValueError(f"{name}: expected shape {format_shape(('B', *event_shape))}, got {shape}")


def sampler_options(n: object, steps: object, t0: object, horizon: float, *, steps_name: str = "steps") -> None:
    """The checks every sampler shares: n (draws) and steps (named `steps_name`) integers >= 1, and
    0 < t0 < horizon (the diffusion's end time T)."""
    positive_int(n, "n")
    positive_int(steps, steps_name)
    number(t0, "t0", low=0.0, high=horizon, high_open=True)
