"""Tests for scoreprior/_checks.py: every validator accepts good values, normalises them, and rejects the rest.

The rule under test: a wrong type (a bool anywhere, a float or str for an integer, a str or tensor for a
number) is a TypeError; a right type with a wrong value (0, negative, inf, NaN, out of range, not an
option) is a ValueError; both messages start with the argument's name and show what it got.
"""

import math
import re

import numpy as np
import pytest
import torch

from scoreprior._checks import (
    batch_shape,
    choice,
    format_shape,
    height_width,
    integer,
    nonnegative_int,
    number,
    number_list,
    positive_float,
    positive_int,
    probability,
    real_tensor,
)

NAN, INF = float("nan"), float("inf")
WRONG_NUMBER_TYPES = [True, False, "1", None, [1.0], torch.tensor(1.0), 1 + 0j]
WRONG_INT_TYPES = WRONG_NUMBER_TYPES + [1.0, 2.5, np.float64(3.0)]


def _raises(error, check, value, *args, **kwargs):
    """`check(value, "arg", ...)` raises `error` whose message names arg and shows the value."""
    with pytest.raises(error, match=r"^arg: expected ") as info:
        check(value, "arg", *args, **kwargs)
    assert re.search(r", got .+", str(info.value)), str(info.value)
    if isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and math.isnan(value)):
        assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [1, 2, 10**12, np.int64(7)])
def test_positive_int_accepts_and_returns_int(value):
    out = positive_int(value, "arg")
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [0, -1, -(10**12), np.int32(0)])
def test_positive_int_rejects_values_below_one(value):
    _raises(ValueError, positive_int, value)
    with pytest.raises(ValueError, match=r"^arg: expected an integer >= 1, got "):
        positive_int(value, "arg")


@pytest.mark.parametrize("value", WRONG_INT_TYPES + [INF, NAN])
def test_positive_int_rejects_other_types(value):
    _raises(TypeError, positive_int, value)


def test_nonnegative_int():
    assert nonnegative_int(0, "arg") == 0 and type(nonnegative_int(np.int16(5), "arg")) is int
    _raises(ValueError, nonnegative_int, -1)
    with pytest.raises(ValueError, match=r"^arg: expected an integer >= 0, got -3$"):
        nonnegative_int(-3, "arg")
    for value in WRONG_INT_TYPES + [INF, NAN]:
        _raises(TypeError, nonnegative_int, value)


def test_integer_bounds():
    assert integer(-5, "arg") == -5
    assert integer(2, "arg", low=2, high=4) == 2 and integer(4, "arg", low=2, high=4) == 4
    assert integer(-7, "arg", high=0) == -7
    for value, bounds, message in ((1, dict(low=2, high=4), r"an integer in \[2, 4\], got 1"),
                                   (5, dict(low=2, high=4), r"an integer in \[2, 4\], got 5"),
                                   (1, dict(high=0), "an integer <= 0, got 1")):
        with pytest.raises(ValueError, match="^arg: expected " + message):
            integer(value, "arg", **bounds)
    _raises(TypeError, integer, True)
    _raises(TypeError, integer, 1.0, low=0)


@pytest.mark.parametrize("value", [1e-300, 0.5, 1, 3.0, 1e300, np.float32(0.25), np.int64(2)])
def test_positive_float_accepts_and_returns_float(value):
    out = positive_float(value, "arg")
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value", [0, 0.0, -0.0, -1e-12, -5, INF, -INF, NAN, np.float64(NAN)])
def test_positive_float_rejects_zero_negative_and_non_finite(value):
    _raises(ValueError, positive_float, value)
    with pytest.raises(ValueError, match="^arg: expected a finite positive number, got "):
        positive_float(value, "arg")


@pytest.mark.parametrize("value", WRONG_NUMBER_TYPES)
def test_positive_float_rejects_other_types(value):
    _raises(TypeError, positive_float, value)


def test_number_intervals():
    assert number(0.0, "arg", low=0.0, low_open=False) == 0.0
    assert number(1, "arg", low=0.0, high=1.0) == 1.0
    assert number(-1e9, "arg", low=-math.inf) == -1e9
    cases = [
        (0.0, dict(low=0.0), "a finite positive number, got 0.0"),
        (-1.0, dict(low=0.0, low_open=False), "a finite number >= 0, got -1.0"),
        (0.5, dict(low=1.5), "a finite number > 1.5, got 0.5"),
        (1.0, dict(low=0.0, high=1.0, high_open=True), r"a number in \(0, 1\), got 1.0"),
        (1.5, dict(low=0.0, high=1.0, low_open=False), r"a number in \[0, 1\], got 1.5"),
        (24.5, dict(low=0.0, high=24.0, low_open=False), r"a number in \[0, 24\], got 24.5"),
        (3.0, dict(low=-math.inf, high=2.0), "a finite number <= 2, got 3.0"),
        (INF, dict(low=-math.inf), "a finite number, got inf"),
        (NAN, dict(low=-math.inf), "a finite number, got nan"),
        (-INF, dict(low=-math.inf), "a finite number, got -inf"),
    ]
    for value, bounds, message in cases:
        with pytest.raises(ValueError, match="^arg: expected " + message + "$"):
            number(value, "arg", **bounds)
    for value in WRONG_NUMBER_TYPES:
        _raises(TypeError, number, value, low=-math.inf)


def test_probability():
    assert probability(0.5, "arg") == 0.5 and type(probability(np.float32(0.25), "arg")) is float
    for value in (0, 0.0, 1, 1.0, -0.1, 1.5, INF, NAN):
        with pytest.raises(ValueError, match=r"^arg: expected a number in \(0, 1\), got "):
            probability(value, "arg")
    for value in WRONG_NUMBER_TYPES:
        _raises(TypeError, probability, value)


def test_choice_lists_the_options():
    assert choice("b", "arg", ("a", "b")) == "b"
    assert choice("x", "arg", ["x"]) == "x"
    with pytest.raises(ValueError, match=r"^arg: expected 'x', got 'y'$"):
        choice("y", "arg", ("x",))
    with pytest.raises(ValueError, match=r"^arg: expected 'a' or 'b', got 'c'$"):
        choice("c", "arg", ("a", "b"))
    with pytest.raises(ValueError, match=r"^arg: expected 'a', 'b' or 'c', got 'A'$"):
        choice("A", "arg", ("a", "b", "c"))
    for value in (None, 1, True, b"a", ("a",)):
        _raises(TypeError, choice, value, ("a", "b"))


def test_height_width():
    assert height_width((4, 8), "arg") == (4, 8)
    assert height_width([np.int64(2), 3], "arg") == (2, 3) and type(height_width([np.int64(2), 3], "arg")[0]) is int
    assert height_width(torch.Size([5, 6]), "arg") == (5, 6)
    for value in ((4,), (1, 2, 3), ()):
        _raises(ValueError, height_width, value)
    with pytest.raises(ValueError, match=r"^arg\[1\]: expected an integer >= 1, got 0$"):
        height_width((4, 0), "arg")
    with pytest.raises(TypeError, match=r"^arg\[0\]: expected an integer >= 1, got 4.0"):
        height_width((4.0, 4), "arg")
    with pytest.raises(TypeError, match=r"^arg\[0\]: expected an integer >= 1, got True"):
        height_width((True, 4), "arg")
    for value in (4, "44", None, np.array([4, 4]), torch.tensor([4, 4])):
        with pytest.raises(TypeError, match=r"^arg: expected \(H, W\)"):
            height_width(value, "arg")


def test_batch_shape_and_format_shape():
    assert format_shape(("B", 1, 8, 8)) == "(B, 1, 8, 8)"
    batch_shape(torch.zeros(3, 2, 2), "x", (2, 2))
    batch_shape(np.zeros((0, 4)), "x", torch.Size([4]))
    for shape in ((3, 4), (2, 2), (3, 2, 2, 1)):
        with pytest.raises(ValueError, match=r"^x: expected shape \(B, 2, 2\), got " + re.escape(str(shape))):
            batch_shape(torch.zeros(shape), "x", (2, 2))
    with pytest.raises(ValueError, match=r"^x: expected shape \(B, 4\), got \(\)"):
        batch_shape(torch.zeros(()), "x", (4,))


def test_real_tensor_converts_arrays_and_detaches():
    a = np.arange(4.0)
    t = real_tensor(a, "arg")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and np.shares_memory(t.numpy(), a)
    w = torch.ones(3, requires_grad=True)
    assert not real_tensor(w, "arg").requires_grad and real_tensor(w, "arg").data_ptr() == w.data_ptr()
    for value in ([1.0], 1.0, None, torch.arange(3), np.arange(3), torch.ones(2, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"^arg: expected a (torch\.Tensor or numpy array|real floating-point "
                                            r"tensor), got \S+"):
            real_tensor(value, "arg")


def test_number_list_flattens_one_or_many():
    assert number_list(0.5, "arg") == [0.5] and number_list(3, "arg") == [3]
    assert number_list([[0.1, 0.2], [0.3, 0.4]], "arg") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert number_list(torch.tensor([1.0, 2.0]), "arg") == [1.0, 2.0] and number_list(np.array([5]), "arg") == [5]
    for value in ([], (), torch.zeros(0)):
        with pytest.raises(ValueError, match=r"^arg: expected at least one value, got none$"):
            number_list(value, "arg")
