"""Tests for scoreprior.eht: station tables, hour angles, elevations, uv-coverage, noise, uvfits."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

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
