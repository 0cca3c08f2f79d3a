import pytest
import torch

from scoreprior.traces import COLOR_SPACING, draw_probes, exact_trace, probe_set_size, quadratic_forms


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _linear(matrix):
    """fn(x) = x M^T per sample, on images (C, H, W): its Jacobian is M."""
    def fn(x):
        return (x.reshape(x.shape[0], -1) @ matrix.T).reshape(x.shape)
    return fn


def _neighbour_matrix(c, h, w, reach):
    """A random symmetric matrix coupling pixels of one channel at most `reach` rows and columns apart."""
    g = _gen(0)
    idx = torch.arange(c * h * w)
    ch, row, col = idx // (h * w), (idx // w) % h, idx % w
    near = ((row[:, None] - row[None]).abs() <= reach) & ((col[:, None] - col[None]).abs() <= reach)
    near &= ch[:, None] == ch[None]
    m = torch.randn(c * h * w, c * h * w, generator=g, dtype=torch.float64) * near
    return m + m.T


def test_coloured_probes_give_the_trace_of_local_couplings_exactly():
    """Couplings within k - 1 pixels never join two pixels of one class: one coloured set is exact."""
    shape = (2, 6, 8)
    matrix = _neighbour_matrix(*shape, reach=COLOR_SPACING - 1)
    x = torch.zeros((3,) + shape, dtype=torch.float64)
    size = probe_set_size("colored", shape)
    assert size == 2 * COLOR_SPACING**2
    for seed in range(3):
        probes = draw_probes("colored", size, x, _gen(seed))
        _, forms = quadratic_forms(_linear(matrix), x, probes, step=torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(forms.sum(0), matrix.trace().expand(3), rtol=1e-12, atol=1e-10)


def test_coloured_sets_are_unbiased_for_any_matrix():
    """Each set sums v v^T to a matrix with the identity's diagonal; over many sets the mean is the trace."""
    shape = (1, 4, 4)
    matrix = torch.randn(16, 16, generator=_gen(1), dtype=torch.float64)
    x = torch.zeros((1,) + shape, dtype=torch.float64)
    sets = 4000
    probes = draw_probes("colored", sets * 4, x, _gen(2))
    outer = torch.einsum("kbi,kbj->bij", probes.reshape(sets * 4, 1, 16), probes.reshape(sets * 4, 1, 16))[0]
    torch.testing.assert_close(outer.diagonal(), torch.full((16,), float(sets), dtype=torch.float64))
    _, forms = quadratic_forms(_linear(matrix), x, probes, step=None)
    estimates = forms.reshape(sets, 4).sum(1)
    se = estimates.std() / sets**0.5
    assert abs(estimates.mean() - matrix.trace()) < 4 * se


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_probes_have_identity_second_moment(probe):
    x = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    probes = draw_probes(probe, 20000, x, _gen(3)).reshape(20000, 2, 9)
    second = torch.einsum("kbi,kbj->bij", probes, probes) / 20000
    torch.testing.assert_close(second, torch.eye(9, dtype=torch.float64).expand(2, 9, 9), rtol=0, atol=0.05)


def test_probe_arguments_are_checked():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="n_probes: coloured probes come in sets of 4"):
        draw_probes("colored", 6, x, None)
    with pytest.raises(ValueError, match="probe"):
        draw_probes("sobol", 2, x, None)
    with pytest.raises(ValueError, match="colored"):
        probe_set_size("colored", (16,))


def test_differences_autograd_and_exact_trace_agree_on_a_linear_map():
    matrix = torch.randn(12, 12, generator=_gen(4), dtype=torch.float64)
    x = torch.randn(2, 3, 2, 2, generator=_gen(5), dtype=torch.float64)
    probes = draw_probes("gaussian", 5, x, _gen(6))
    value_d, forms_d = quadratic_forms(_linear(matrix), x, probes, step=torch.full((2,), 0.1, dtype=torch.float64))
    value_a, forms_a = quadratic_forms(_linear(matrix), x, probes, step=None)
    torch.testing.assert_close(value_d, value_a)
    torch.testing.assert_close(forms_d, forms_a)
    value, trace = exact_trace(_linear(matrix), x, chunk_size=5)
    torch.testing.assert_close(value, value_a)
    torch.testing.assert_close(trace, matrix.trace().expand(2))


@pytest.mark.parametrize("probe, n", [("rademacher", 2), ("gaussian", 2), ("colored", 4)])
def test_one_generator_gives_the_same_probes_in_float32_and_float64(probe, n):
    """So that a float32 and a float64 log p with the same seed differ by rounding only, not by their probes."""
    x = torch.zeros(3, 1, 4, 4)
    single = draw_probes(probe, n, x, torch.Generator().manual_seed(0))
    double = draw_probes(probe, n, x.double(), torch.Generator().manual_seed(0))
    assert double.dtype == torch.float64 and torch.equal(single.double(), double)
