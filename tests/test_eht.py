"""Tests for scoreprior.eht: station tables, hour angles, elevations, uv-coverage, noise, uvfits."""

from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scoreprior import eht

# ../shared beside the checkout (as laid out for CI), or SCOREPRIOR_SHARED_DATA pointing at shared/data.
SHARED = Path(os.environ.get("SCOREPRIOR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "eht"
UVFITS = SHARED / "hops_lo_3601_M87+zbl-dtcal_selfcal.uvfits"
M87 = dict(ra_hours=12.5137, dec_deg=12.3911, mjd=57854)
LAMBDA_230 = eht.SPEED_OF_LIGHT / 230e9


@pytest.fixture(scope="module")
def eht2017() -> eht.Array:
    return eht.load_array("EHT2017")


@pytest.fixture(scope="module")
def m87(eht2017: eht.Array) -> eht.UVCoverage:
    return eht.uv_coverage(eht2017, **M87)


# Station tables


def test_eht2017_stations(eht2017: eht.Array) -> None:
    assert eht2017.names == ["PV", "SMT", "SMA", "LMT", "ALMA", "SPT", "APEX", "JCMT"]
    alma = eht2017["ALMA"]
    expected = (2225061.164, -5440057.37, -2481681.15, 90, 90)
    assert (alma.x, alma.y, alma.z, alma.sefd_r, alma.sefd_l) == expected
    assert eht2017.xyz.shape == (8, 3)


@pytest.mark.parametrize("name", eht.available_arrays())
def test_bundled_tables_match_ehtim_files(name: str) -> None:
    source = SHARED / f"{name}.txt"
    if not source.exists():
        pytest.skip(f"{source} not available")
    lines = source.read_text().splitlines()
    rows = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    array = eht.load_array(name)
    assert array.names == [r[0] for r in rows]
    expected = np.array([[float(f) for f in r[1:6]] for r in rows])
    got = np.array([[s.x, s.y, s.z, s.sefd_r, s.sefd_l] for s in array])
    np.testing.assert_array_equal(got, expected)
    # load_array_file reads eht-imaging's 13-column files as they are.
    assert eht.load_array_file(source).stations == array.stations


def test_m87_sefds_and_mean() -> None:
    sma = eht.load_array("EHT2017_m87")["SMA"]
    assert (sma.sefd_r, sma.sefd_l, sma.sefd) == (5600, 6500, 6050)
    assert len(eht.load_array("EHT2025")) == 12


def test_load_array_unknown_name() -> None:
    with pytest.raises(ValueError, match="name.*EHT2017"):
        eht.load_array("ALMA2030")


def test_load_array_file_roundtrip_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "mini.txt"
    good.write_text("# NAME X Y Z SEFDR SEFDL\nA 1 2 3 10 20\n\nB 4 5 6 30 40\n")
    array = eht.load_array_file(good)
    assert array.name == "mini" and array.names == ["A", "B"]
    assert array["B"].xyz.tolist() == [4.0, 5.0, 6.0]
    short = tmp_path / "short.txt"
    short.write_text("A 1 2 3 10\n")
    with pytest.raises(ValueError, match="path.*line 1"):
        eht.load_array_file(short)
    duplicate = tmp_path / "dup.txt"
    duplicate.write_text("A 1 2 3 10 10\nA 1 2 3 10 10\n")
    with pytest.raises(ValueError, match="stations.*duplicates"):
        eht.load_array_file(duplicate)


def test_subset_keeps_array_order(eht2017: eht.Array) -> None:
    small = eht2017.subset(["SMA", "ALMA", "LMT"])
    assert small.names == ["SMA", "LMT", "ALMA"]
    with pytest.raises(ValueError, match="names.*KP"):
        eht2017.subset(["ALMA", "KP"])
    with pytest.raises(ValueError, match="names"):
        eht2017.subset(["ALMA", "ALMA"])
    with pytest.raises(ValueError, match="names"):
        eht2017.subset([])


# Sidereal time, hour angle, elevation


def test_gmst_against_independent_values() -> None:
    # J2000.0 (2000 Jan 1, 12h UT): GMST = 18h 41m 50.548s (Astronomical Almanac).
    assert eht.gmst_hours(51544, 12.0) == pytest.approx(18 + 41 / 60 + 50.548 / 3600, abs=1e-6)
    # GSTIA0 = 199.4021982 deg at 0h on 2017-04-11, written by the correlator in the M87 uvfits AN table.
    assert 15 * eht.gmst_hours(57854, 0.0) == pytest.approx(199.4021982, abs=0.01)
    # A sidereal day later GMST is back where it was.
    assert eht.gmst_hours(57854, 24 / 1.00273790935) == pytest.approx(eht.gmst_hours(57854, 0.0), abs=1e-6)


def test_transit_at_local_hour_angle_zero(eht2017: eht.Array) -> None:
    ha = np.linspace(-12, 12, 24 * 3600, endpoint=False)
    for station in eht2017.subset(["PV", "SMT", "SMA", "ALMA"]):
        el = eht.elevation_deg(station.xyz, ha, 20.0)[:, 0]
        transit_ha = ha[np.argmax(el)]
        # local hour angle = H + east longitude = 0 at transit (wrapped into [-12, 12)).
        local = (transit_ha + station.longitude_deg / 15 + 12) % 24 - 12
        assert abs(local) < 2 / 3600
        assert el.max() == pytest.approx(90 - abs(station.latitude_deg - 20.0), abs=1e-6)


def test_zenith_when_dec_equals_latitude(eht2017: eht.Array) -> None:
    for station in eht2017:
        if station.name == "SPT":
            continue
        el = eht.elevation_deg(station.xyz, -station.longitude_deg / 15, station.latitude_deg)
        assert el.item() == pytest.approx(90.0, abs=1e-5)
    # From the south pole, a source at declination -30 deg sits at 30 deg elevation at every hour angle.
    spt_el = eht.elevation_deg(eht2017["SPT"].xyz, np.linspace(-12, 12, 7), -30.0)
    np.testing.assert_allclose(spt_el, 30.0, atol=1e-5)


# (u, v, w) identities


def test_uvw_norm_and_bounds() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(size=(50, 3)) * 5e6
    ha = rng.uniform(-12, 12, size=50)
    for dec in (-60.0, 0.0, 12.3911, 90.0):
        u, v, w = eht.baseline_uvw(b, ha, dec, wavelength=LAMBDA_230)
        length = np.linalg.norm(b, axis=1) / LAMBDA_230
        np.testing.assert_allclose(np.sqrt(u**2 + v**2 + w**2), length, rtol=1e-12)
        assert np.all(np.hypot(u, v) <= length * (1 + 1e-12))
        # w is the projection on the source direction.
        towards_source = np.sum(b * eht.source_direction(ha, dec), axis=1) / LAMBDA_230
        np.testing.assert_allclose(w, towards_source, rtol=1e-9)


def test_uvw_sign_convention_east_north() -> None:
    # Source on the meridian of Greenwich (H = 0) at dec 0: a baseline pointing east (+Y) has u > 0,
    # one pointing north (+Z) has v > 0, one pointing at the source (+X) has only w.
    u, v, w = eht.baseline_uvw(np.eye(3) * LAMBDA_230, 0.0, 0.0, wavelength=LAMBDA_230)
    np.testing.assert_allclose(np.stack([u, v, w]), np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]), atol=1e-15)


def test_coverage_rows_respect_identities(eht2017: eht.Array, m87: eht.UVCoverage) -> None:
    index = {n: k for k, n in enumerate(eht2017.names)}
    xyz = eht2017.xyz
    b = xyz[[index[n] for n in m87.t1]] - xyz[[index[n] for n in m87.t2]]
    length = np.linalg.norm(b, axis=1) / LAMBDA_230
    assert np.all(np.hypot(m87.u, m87.v) <= length * (1 + 1e-12))
    np.testing.assert_allclose(np.sqrt(m87.u**2 + m87.v**2 + m87.w**2), length, rtol=1e-12)
    ha = eht.greenwich_hour_angle(M87["ra_hours"], M87["mjd"], m87.time)
    el = eht.elevation_deg(xyz, ha, M87["dec_deg"])
    rows = np.arange(len(m87))
    for names in (m87.t1, m87.t2):
        e = el[rows, [index[n] for n in names]]
        assert np.all((e >= 10.0) & (e <= 85.0))


def test_swapping_stations_negates_uv(eht2017: eht.Array, m87: eht.UVCoverage) -> None:
    swapped = eht.uv_coverage(list(reversed(eht2017.stations)), **M87)
    assert len(swapped) == len(m87)
    forward = {(t, a, b): (u, v) for t, a, b, u, v in zip(m87.time, m87.t1, m87.t2, m87.u, m87.v)}
    for t, a, b, u, v in zip(swapped.time, swapped.t1, swapped.t2, swapped.u, swapped.v):
        fu, fv = forward[(t, b, a)]
        assert (u, v) == (-fu, -fv)


def test_polar_source_traces_circles(eht2017: eht.Array) -> None:
    cov = eht.uv_coverage(eht2017, 3.0, 90.0, 57854, tadv=300.0)
    assert set(cov.stations) == {"PV", "SMT", "SMA", "LMT", "JCMT"}
    for a, b in {(a, b) for a, b in zip(cov.t1, cov.t2)}:
        rows = (cov.t1 == a) & (cov.t2 == b)
        assert rows.sum() == 288  # the pole never rises or sets: every scan of the day
        bx, by, _ = eht2017[a].xyz - eht2017[b].xyz
        radius = np.hypot(cov.u[rows], cov.v[rows])
        np.testing.assert_allclose(radius, math.hypot(bx, by) / LAMBDA_230, rtol=1e-12)


# The EHT 2017 M87 observation


def test_m87_coverage(m87: eht.UVCoverage) -> None:
    assert m87.stations == ["ALMA", "APEX", "JCMT", "LMT", "PV", "SMA", "SMT"]
    assert "SPT" not in set(m87.t1) | set(m87.t2)
    radius = np.hypot(m87.u, m87.v)
    assert 8.0e9 < radius.max() < 8.6e9
    assert m87.uv.shape == (len(m87), 2)
    scans = np.arange(0.0, 24.0, 600.0 / 3600.0)
    assert np.all(np.isin(m87.time, scans)) and np.all(np.diff(m87.time) >= 0)
    # Intra-site baselines: ALMA-APEX is 2.6 km (2.0 M lambda), SMA-JCMT 164 m (0.13 M lambda).
    for a, b, low, high in (("ALMA", "APEX", 1e6, 2.1e6), ("SMA", "JCMT", 1e4, 1.3e5)):
        rows = (m87.t1 == a) & (m87.t2 == b)
        assert rows.any()
        assert low < radius[rows].min() and radius[rows].max() < high


def test_subset_coverage_is_a_subset(eht2017: eht.Array, m87: eht.UVCoverage) -> None:
    small = eht.uv_coverage(eht2017.subset(["ALMA", "LMT", "SMA"]), **M87)
    assert set(zip(small.t1, small.t2)) == {("SMA", "LMT"), ("SMA", "ALMA"), ("LMT", "ALMA")}
    full = {(t, a, b): (u, v) for t, a, b, u, v in zip(m87.time, m87.t1, m87.t2, m87.u, m87.v)}
    for t, a, b, u, v in zip(small.time, small.t1, small.t2, small.u, small.v):
        assert full[(t, a, b)] == (u, v)


# Thermal noise


def test_thermal_noise_by_hand(eht2017: eht.Array, m87: eht.UVCoverage) -> None:
    # ALMA (90 Jy) with LMT (600 Jy), 4 GHz, 60 s: sqrt(54000 / 4.8e11) / 0.88 / sqrt(2) = 2.695123e-4 Jy.
    assert eht.thermal_noise(90.0, 600.0, bw=4e9, tint=60.0) == pytest.approx(2.695123e-4, rel=1e-6)
    rows = (m87.t1 == "LMT") & (m87.t2 == "ALMA")
    np.testing.assert_allclose(m87.sigma[rows], 2.695123e-4, rtol=1e-6)
    # SEFD is the mean of R and L: SMA in EHT2017_m87 has 5600 / 6500 Jy, so 6050 Jy.
    m87_array = eht.load_array("EHT2017_m87").subset(["SMA", "JCMT"])
    cov = eht.uv_coverage(m87_array, **M87, tint=10.0, bw=2e9)
    expected = math.sqrt(6050 * 10000 / (2 * 2e9 * 10)) / 0.88 / math.sqrt(2)
    np.testing.assert_allclose(cov.sigma, expected, rtol=1e-12)


# Input validation


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(dec_deg=91.0), "dec_deg"),
        (dict(ra_hours=-1.0), "ra_hours"),
        (dict(mjd=float("nan")), "mjd"),
        (dict(tstart=5.0, tstop=5.0), "tstop"),
        (dict(tint=0.0), "tint"),
        (dict(tadv=-600.0), "tadv"),
        (dict(rf=0.0), "rf"),
        (dict(bw=float("inf")), "bw"),
        (dict(elevmin=30.0, elevmax=20.0), "elevmin"),
    ],
)
def test_bad_inputs_name_the_argument(eht2017: eht.Array, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        eht.uv_coverage(eht2017, **{**M87, **kwargs})


def test_too_few_stations(eht2017: eht.Array) -> None:
    with pytest.raises(ValueError, match="stations"):
        eht.uv_coverage(eht2017.subset(["ALMA"]), **M87)


# uvfits reader (optional: needs astropy and the shared data file)


def test_read_uvfits_matches_geometry() -> None:
    fits = pytest.importorskip("astropy.io.fits")
    if not UVFITS.exists():
        pytest.skip(f"{UVFITS} not available")
    data = eht.read_uvfits(UVFITS)
    assert len(data) == 5877 and data.mjd == 57854
    assert data.freq == pytest.approx(227.0707e9, rel=1e-6)
    assert list(data.station_names) == ["AA", "AP", "AZ", "LM", "PV", "SM"]
    assert np.iscomplexobj(data.vis) and np.all(data.sigma > 0)
    # The correlator's (u, v) equal our geometry for B = r_t1 - r_t2 at the file's antenna positions,
    # up to UT1 - UTC = 0.46 s (~3e-5 of the baseline length), which gmst_hours neglects.
    with fits.open(UVFITS) as hdul:
        xyz = np.asarray(hdul["AIPS AN"].data["STABXYZ"], dtype=np.float64)
        ra_hours = hdul[0].header["OBSRA"] / 15
        dec_deg = hdul[0].header["OBSDEC"]
    ha = eht.greenwich_hour_angle(ra_hours, data.mjd, data.time)
    baselines = xyz[data.ant1] - xyz[data.ant2]
    u, v, _ = eht.baseline_uvw(baselines, ha, dec_deg, wavelength=eht.SPEED_OF_LIGHT / data.freq)
    scale = np.hypot(data.u, data.v).max()
    assert np.abs(u - data.u).max() < 1e-4 * scale
    assert np.abs(v - data.v).max() < 1e-4 * scale


def test_read_uvfits_without_astropy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "astropy.io", None)
    with pytest.raises(ImportError, match=r"scoreprior\[astro\]"):
        eht.read_uvfits("unused.uvfits")


# Closure quantities


def _random_vis(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1.0 + rng.random(n)) * np.exp(1j * rng.uniform(-np.pi, np.pi, n))


def _wrapped(a: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * a))


def _point_source_vis(cover: eht.UVCoverage, offsets_rad: list[tuple[float, float, float]]) -> np.ndarray:
    """Visibilities of point sources (flux, l, m): sum f exp(+2πi(u l + v m)) (scoreprior's sign)."""
    return sum(f * np.exp(2j * np.pi * (cover.u * l + cover.v * m)) for f, l, m in offsets_rad)


def test_closure_counts_per_time_stamp(m87: eht.UVCoverage) -> None:
    vis = _random_vis(len(m87))
    phases, amplitudes = eht.closure_quantities(m87, vis)
    for t in np.unique(m87.time):
        here = m87.time == t
        n = len(set(m87.t1[here]) | set(m87.t2[here]))
        assert here.sum() == n * (n - 1) // 2  # every baseline of the visible stations
        assert (phases.time == t).sum() == (n - 1) * (n - 2) // 2
        assert (amplitudes.time == t).sum() == max(n * (n - 3) // 2, 0)
    # eht-imaging's reference-station set when all baselines are present: every triangle holds the reference.
    first = {t: phases.stations[phases.time == t][0, 0] for t in np.unique(phases.time)}
    assert all(row[0] == first[t] for row, t in zip(phases.stations, phases.time))


def _all_candidate_rank(cover: eht.UVCoverage, t: float, size: int) -> int:
    """Rank of every triangle (size 3) or quadrangle (size 4) of the baselines at time t, built here directly."""
    here = np.flatnonzero(cover.time == t)
    column = {frozenset((cover.t1[i], cover.t2[i])): k for k, i in enumerate(here)}
    orient = {(cover.t1[i], cover.t2[i]): 1 for i in here} | {(cover.t2[i], cover.t1[i]): -1 for i in here}
    names = sorted(set(cover.t1[here]) | set(cover.t2[here]))
    vectors = []
    for group in itertools.permutations(names, size):
        if size == 3:
            pairs = [(group[0], group[1]), (group[1], group[2]), (group[2], group[0])]
        else:
            pairs = [(group[0], group[1]), (group[2], group[3]), (group[0], group[2]), (group[1], group[3])]
        if not all(frozenset(p) in column for p in pairs):
            continue
        v = np.zeros(len(here))
        for k, p in enumerate(pairs):
            v[column[frozenset(p)]] += orient[p] if size == 3 else (1 if k < 2 else -1)
        vectors.append(v)
    return int(np.linalg.matrix_rank(np.array(vectors))) if vectors else 0


def test_closures_with_missing_baselines_are_a_maximal_independent_set(m87: eht.UVCoverage) -> None:
    drop = (m87.t1 == "ALMA") & (m87.t2 == "LMT") | (m87.t1 == "SMT") & (m87.t2 == "PV")
    cover = eht.UVCoverage(*(getattr(m87, f)[~drop] for f in ("time", "t1", "t2", "u", "v", "w", "sigma")))
    phases, amplitudes = eht.closure_quantities(cover, _random_vis(len(cover)))
    for t in np.unique(cover.time)[::7]:
        assert (phases.time == t).sum() == _all_candidate_rank(cover, t, 3)
        assert (amplitudes.time == t).sum() == _all_candidate_rank(cover, t, 4)


def test_closures_do_not_depend_on_baseline_orientation(m87: eht.UVCoverage) -> None:
    vis = _random_vis(len(m87))
    flip = np.random.default_rng(1).random(len(m87)) < 0.5
    t1, t2 = np.where(flip, m87.t2, m87.t1), np.where(flip, m87.t1, m87.t2)
    for function in (eht.closure_phases, eht.log_closure_amplitudes):
        a = function(m87.time, m87.t1, m87.t2, vis, m87.sigma)
        b = function(m87.time, t1, t2, np.where(flip, np.conj(vis), vis), m87.sigma)
        np.testing.assert_array_equal(a.stations, b.stations)
        np.testing.assert_allclose(_wrapped(a.value - b.value), 0, atol=1e-12)
        np.testing.assert_allclose(a.sigma, b.sigma)


def test_closures_are_immune_to_station_gains(m87: eht.UVCoverage) -> None:
    vis = _random_vis(len(m87))
    rng = np.random.default_rng(2)
    gains = {(t, s): rng.uniform(0.8, 1.2) * np.exp(1j * rng.uniform(-np.pi, np.pi))
             for t in np.unique(m87.time) for s in m87.stations}
    g1 = np.array([gains[t, s] for t, s in zip(m87.time, m87.t1)])
    g2 = np.array([gains[t, s] for t, s in zip(m87.time, m87.t2)])
    corrupted = g1 * np.conj(g2) * vis
    phases, amplitudes = eht.closure_quantities(m87, vis)
    phases_g, amplitudes_g = eht.closure_quantities(m87, corrupted)
    np.testing.assert_allclose(_wrapped(phases.value - phases_g.value), 0, atol=1e-12)
    np.testing.assert_allclose(amplitudes.value, amplitudes_g.value, atol=1e-12)
    # The differentiable model evaluation agrees with the table's values.
    model = phases.of(torch.as_tensor(corrupted))
    np.testing.assert_allclose(_wrapped(model.numpy() - phases.value), 0, atol=1e-12)
    np.testing.assert_allclose(amplitudes.of(torch.as_tensor(corrupted)).numpy(), amplitudes.value, atol=1e-12)


def test_closure_phases_of_point_sources(m87: eht.UVCoverage) -> None:
    uas = np.pi / 180 / 3600 / 1e6
    centred = eht.closure_phases(m87.time, m87.t1, m87.t2, _point_source_vis(m87, [(1.0, 0, 0)]), m87.sigma)
    shifted = eht.closure_phases(m87.time, m87.t1, m87.t2, _point_source_vis(m87, [(1.0, 23 * uas, -31 * uas)]),
                                 m87.sigma)
    np.testing.assert_allclose(centred.value, 0, atol=1e-12)
    np.testing.assert_allclose(_wrapped(shifted.value), 0, atol=1e-9)
    # Shift invariance holds for any source; an asymmetric one has non-zero closure phases.
    pair = [(1.0, 0, 0), (0.5, 20 * uas, 5 * uas)]
    moved = [(f, l + 11 * uas, m - 7 * uas) for f, l, m in pair]
    asym = eht.closure_phases(m87.time, m87.t1, m87.t2, _point_source_vis(m87, pair), m87.sigma)
    asym_moved = eht.closure_phases(m87.time, m87.t1, m87.t2, _point_source_vis(m87, moved), m87.sigma)
    np.testing.assert_allclose(_wrapped(asym.value - asym_moved.value), 0, atol=1e-9)
    assert np.abs(asym.value).max() > 0.5
    # Log closure amplitudes of a point source vanish; they do not change with the flux scale.
    amplitudes = eht.log_closure_amplitudes(m87.time, m87.t1, m87.t2, _point_source_vis(m87, pair), m87.sigma)
    scaled = eht.log_closure_amplitudes(m87.time, m87.t1, m87.t2, 3 * _point_source_vis(m87, pair), m87.sigma)
    np.testing.assert_allclose(amplitudes.value, scaled.value, atol=1e-12)
    point = eht.log_closure_amplitudes(m87.time, m87.t1, m87.t2, _point_source_vis(m87, [(2.0, 0, 0)]), m87.sigma)
    np.testing.assert_allclose(point.value, 0, atol=1e-12)


def test_closure_noise_matches_monte_carlo(m87: eht.UVCoverage) -> None:
    """First-order sigma and the covariance blocks against thermal noise at SNR >= 50."""
    keep = m87.time <= np.unique(m87.time)[40]
    cover = eht.UVCoverage(*(getattr(m87, f)[keep] for f in ("time", "t1", "t2", "u", "v", "w", "sigma")))
    vis = _random_vis(len(cover), seed=3)
    sigma = np.abs(vis) / np.random.default_rng(4).uniform(50, 200, len(cover))
    phases, amplitudes = eht.closure_quantities(eht.UVCoverage(*(getattr(cover, f) for f in (
        "time", "t1", "t2", "u", "v", "w")), sigma=sigma), vis)
    rng = np.random.default_rng(5)
    draws = 4000
    noisy = vis + sigma * (rng.standard_normal((draws, len(vis))) + 1j * rng.standard_normal((draws, len(vis))))
    for closures in (phases, amplitudes):
        errors = closures.of(torch.as_tensor(noisy)).numpy() - closures.value
        if closures is phases:
            errors = _wrapped(errors)
        np.testing.assert_allclose(errors.std(0), closures.sigma, rtol=0.05)
        for index, cov in closures.covariance()[:5]:
            empirical = np.cov(errors[:, index], rowvar=False).reshape(len(index), len(index))
            scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
            np.testing.assert_allclose(empirical / scale, cov / scale, atol=0.06)
        assert any(np.abs(cov - np.diag(np.diag(cov))).max() > 0 for _, cov in closures.covariance())


def test_closure_input_errors(m87: eht.UVCoverage) -> None:
    vis = _random_vis(len(m87))
    with pytest.raises(ValueError, match="vis: expected shape"):
        eht.closure_phases(m87.time, m87.t1, m87.t2, vis[:-1], m87.sigma)
    with pytest.raises(ValueError, match="vis: expected finite non-zero"):
        eht.log_closure_amplitudes(m87.time, m87.t1, m87.t2, np.where(np.arange(len(vis)) == 3, 0, vis), m87.sigma)
    with pytest.raises(ValueError, match="sigma: expected finite positive"):
        eht.closure_phases(m87.time, m87.t1, m87.t2, vis, -m87.sigma)
    twice = np.r_[m87.time, m87.time[:1]], np.r_[m87.t1, m87.t2[:1]], np.r_[m87.t2, m87.t1[:1]]
    with pytest.raises(ValueError, match="appears twice"):
        eht.closure_phases(*twice, np.r_[vis, vis[:1]], np.r_[m87.sigma, m87.sigma[:1]])
    with pytest.raises(ValueError, match="vis: a UVCoverage holds no visibilities"):
        eht.closure_quantities(m87)
    with pytest.raises(ValueError, match="stations: expected distinct names covering"):
        eht.closure_phases(m87.time, m87.t1, m87.t2, vis, m87.sigma, stations=["ALMA"])
    with pytest.raises(ValueError, match="time: expected a 1-D array"):
        eht.closure_phases(m87.time[:, None], m87.t1, m87.t2, vis, m87.sigma)


def test_average_visibilities_is_an_inverse_variance_mean() -> None:
    # Two scans of three 10 s records each on one baseline, then a gap of 5 minutes.
    seconds = np.array([0, 10, 20, 320, 330, 340.0])
    sigma = np.array([1.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    vis = np.array([1 + 1j, 2, 3, 4j, 5j, 6j])
    data = eht.UVFitsData(u=np.arange(6.0), v=np.zeros(6), vis=vis, sigma=sigma, time=seconds / 3600, mjd=1,
                          ant1=np.zeros(6, int), ant2=np.ones(6, int), t1=np.array(["A"] * 6),
                          t2=np.array(["B"] * 6), station_names=np.array(["A", "B"]), freq=1.0)
    scans = eht.average_visibilities(data, 600.0)
    w = 1 / sigma[:3] ** 2
    np.testing.assert_allclose(scans.vis, [(w * vis[:3]).sum() / w.sum(), 5j])
    np.testing.assert_allclose(scans.sigma, [w.sum() ** -0.5, 3**-0.5])
    np.testing.assert_allclose(scans.time * 3600, [10, 330])
    np.testing.assert_allclose(scans.u, [(w * np.arange(3)).sum() / w.sum(), 4])
    assert len(eht.average_visibilities(data, 15.0)) == 4  # windows [0, 10], [20], [320, 330], [340]
    with pytest.raises(ValueError, match="seconds"):
        eht.average_visibilities(data, 0.0)


@pytest.mark.skipif(not UVFITS.exists(), reason="the EHT 2017 M87 uvfits is not available")
def test_real_data_closures_per_scan() -> None:
    data = eht.read_uvfits(UVFITS)
    scans = eht.average_visibilities(data, 600.0)
    assert len(np.unique(scans.time)) == 22  # the 22 scans of April 11 (low band)
    phases, amplitudes = eht.closure_quantities(scans)
    for t in np.unique(scans.time):
        n = len(set(scans.t1[scans.time == t]) | set(scans.t2[scans.time == t]))
        assert (phases.time == t).sum() == (n - 1) * (n - 2) // 2
        assert (amplitudes.time == t).sum() == max(n * (n - 3) // 2, 0)
    assert phases.stations[0, 0] == "AA"  # ALMA, the station with the most records, is the reference
