"""Radio-interferometric geometry for the Event Horizon Telescope: stations, uv-coverage, thermal noise,
uvfits data and closure quantities.

Frames and units (the conventions of eht-imaging):
- Stations sit at geocentric Earth-fixed (ITRF) positions r = (X, Y, Z) in metres: X towards longitude 0
  on the equator, Y towards longitude 90 deg E, Z towards the north pole.
- A source at right ascension RA (hours) and declination dec (degrees) has Greenwich hour angle
  H = GMST - RA (hours). In the Earth-fixed frame its direction is
  s = (cos dec cos H, -cos dec sin H, sin dec), so a station at east longitude L sees it at local hour
  angle H + L and it transits (culminates) where H + L = 0.
- Baseline (t1, t2) is B = r_t1 - r_t2. Projected on the sky (Thompson, Moran & Swenson 2017, eq. 4.1,
  with the Greenwich hour angle because B is Earth-fixed), in wavelengths lambda = c / rf:
      u = ( Bx sin H + By cos H) / lambda                               (towards east)
      v = (-Bx sin dec cos H + By sin dec sin H + Bz cos dec) / lambda  (towards north)
      w = ( Bx cos dec cos H - By cos dec sin H + Bz sin dec) / lambda  (towards the source)
  (u, v, w) are B in the orthonormal basis (east, north, s), so |(u, v, w)| = |B| / lambda.
- Elevations use the geocentric station direction: sin(el) = (r / |r|) . s.

Closure quantities (eht-imaging's conventions). A station gain g multiplies V_ab by g_a conj(g_b). The
closure phase of a triangle, arg(V_ab V_bc V_ca), cancels every phase; the log closure amplitude of a
quadrangle, log(|V_ab| |V_cd| / (|V_ac| |V_bd|)), every amplitude. Both are formed from the visibilities
of one time stamp, so average coherently first (`average_visibilities`) when single records have an SNR
below a few: the first-order noise sigma = sqrt(sum sigma_i^2 / |V_i|^2) (sigma_i per component) holds at
high SNR only, and log amplitudes are biased at low SNR.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from scoreprior._checks import number, positive_float

__all__ = [
    "SPEED_OF_LIGHT",
    "Station",
    "Array",
    "available_arrays",
    "load_array",
    "load_array_file",
    "gmst_hours",
    "greenwich_hour_angle",
    "source_direction",
    "elevation_deg",
    "baseline_uvw",
    "thermal_noise",
    "UVCoverage",
    "uv_coverage",
    "UVFitsData",
    "read_uvfits",
    "average_visibilities",
    "ClosureQuantities",
    "ClosurePhases",
    "LogClosureAmplitudes",
    "closure_phases",
    "log_closure_amplitudes",
    "closure_quantities",
]

SPEED_OF_LIGHT = 299_792_458.0
"""Speed of light in m/s."""

_QUANTIZATION_EFFICIENCY = 0.88
"""Two-bit digitisation loss of VLBI correlators (eht-imaging's value)."""

_ARRAY_NAMES = ("EHT2017", "EHT2017_m87", "EHT2025")


@dataclass(frozen=True)
class Station:
    """A telescope: name, geocentric position (x, y, z) in metres, SEFDs of the R and L feeds in Jy."""

    name: str
    x: float
    y: float
    z: float
    sefd_r: float
    sefd_l: float

    @property
    def xyz(self) -> np.ndarray:
        """(3,) geocentric Earth-fixed position in metres."""
        return np.array([self.x, self.y, self.z], dtype=np.float64)

    @property
    def sefd(self) -> float:
        """Mean of the R and L SEFDs in Jy, the value used for Stokes-I noise."""
        return 0.5 * (self.sefd_r + self.sefd_l)

    @property
    def latitude_deg(self) -> float:
        """Geocentric latitude in degrees (north positive)."""
        return math.degrees(math.atan2(self.z, math.hypot(self.x, self.y)))

    @property
    def longitude_deg(self) -> float:
        """East longitude in degrees, in (-180, 180]."""
        return math.degrees(math.atan2(self.y, self.x))


@dataclass(frozen=True)
class Array:
    """A named, ordered set of stations. The order fixes baseline orientation (t1 before t2)."""

    name: str
    stations: tuple[Station, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.stations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stations: names must be unique, got duplicates {duplicates}")

    @property
    def names(self) -> list[str]:
        """Station names in array order."""
        return [s.name for s in self.stations]

    @property
    def xyz(self) -> np.ndarray:
        """(S, 3) station positions in metres."""
        return np.array([[s.x, s.y, s.z] for s in self.stations], dtype=np.float64).reshape(-1, 3)

    @property
    def sefd(self) -> np.ndarray:
        """(S,) mean SEFDs in Jy."""
        return np.array([s.sefd for s in self.stations], dtype=np.float64)

    def __len__(self) -> int:
        return len(self.stations)

    def __iter__(self) -> Iterator[Station]:
        return iter(self.stations)

    def __getitem__(self, name: str) -> Station:
        """The station called `name` (KeyError if absent)."""
        for station in self.stations:
            if station.name == name:
                return station
        raise KeyError(f"no station {name!r} in array {self.name!r}; stations: {self.names}")

    def subset(self, names: Iterable[str]) -> Array:
        """The stations called `names`, kept in this array's order (so baselines keep their orientation).

        names: station names, e.g. ["ALMA", "LMT", "SMA"] for a three-telescope experiment.
        Raises ValueError if a name is unknown or repeated, or if `names` is empty.
        """
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise ValueError(f"names: unknown stations {unknown}; array {self.name!r} has {self.names}")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"names: expected distinct station names, got {wanted}")
        if not wanted:
            raise ValueError("names: expected at least one station name, got none")
        kept = tuple(s for s in self.stations if s.name in wanted)
        return Array(name=f"{self.name}[{','.join(s.name for s in kept)}]", stations=kept)


def available_arrays() -> list[str]:
    """Names of the station tables shipped with scoreprior."""
    return list(_ARRAY_NAMES)


def _parse_array_text(text: str, *, source: str, name: str) -> Array:
    stations = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 6:
            raise ValueError(
                f"path: {source} line {lineno}: expected at least 6 columns "
                f"(NAME X Y Z SEFDR SEFDL), got {len(fields)}"
            )
        try:
            x, y, z, sefd_r, sefd_l = (float(f) for f in fields[1:6])
        except ValueError as err:
            raise ValueError(f"path: {source} line {lineno}: non-numeric X, Y, Z or SEFD ({err})") from None
        stations.append(Station(fields[0], x, y, z, sefd_r, sefd_l))
    if not stations:
        raise ValueError(f"path: {source} holds no stations")
    return Array(name=name, stations=tuple(stations))


def load_array_file(path: str | Path, *, name: str | None = None) -> Array:
    """Read a station table.

    Format: one station per line, whitespace-separated `NAME X Y Z SEFDR SEFDL` (metres, metres, metres,
    Jy, Jy); further columns are ignored, so eht-imaging array files load as they are. Blank lines and
    lines starting with '#' are skipped.
    path: the text file. name: the array's name (default: the file's stem).
    """
    path = Path(path)
    return _parse_array_text(path.read_text(), source=str(path), name=name or path.stem)


def load_array(name: str) -> Array:
    """A station table shipped with scoreprior: "EHT2017", "EHT2017_m87" (M87 2017 SEFDs) or "EHT2025".

    Coordinates and SEFDs come from eht-imaging's array files (see the header of scoreprior/arrays/*.txt).
    """
    if name not in _ARRAY_NAMES:
        raise ValueError(f"name: unknown array {name!r}; available: {list(_ARRAY_NAMES)}")
    text = resources.files("scoreprior").joinpath("arrays").joinpath(f"{name}.txt").read_text()
    return _parse_array_text(text, source=f"scoreprior/arrays/{name}.txt", name=name)


def gmst_hours(mjd: float | np.ndarray, ut_hours: float | np.ndarray) -> np.ndarray:
    """Greenwich mean sidereal time in hours, in [0, 24).

    GMST = 18.697374558 + 24.06570982441908 (JD - 2451545.0), JD = MJD + 2400000.5 + UT / 24
    (USNO approximation, ~0.1 s per century; UT1 - UTC is neglected).
    mjd: day number(s); ut_hours: UT in hours (may exceed 24); broadcast together.
    """
    jd = np.asarray(mjd, dtype=np.float64) + 2400000.5 + np.asarray(ut_hours, dtype=np.float64) / 24.0
    return np.mod(18.697374558 + 24.06570982441908 * (jd - 2451545.0), 24.0)


def greenwich_hour_angle(ra_hours: float, mjd: float, ut_hours: float | np.ndarray) -> np.ndarray:
    """Greenwich hour angle H = GMST - RA in hours, wrapped to [-12, 12).

    ra_hours: right ascension in hours; mjd: day number; ut_hours: scalar or (T,) UT in hours.
    """
    return np.mod(gmst_hours(mjd, ut_hours) - ra_hours + 12.0, 24.0) - 12.0


def source_direction(ha_hours: float | np.ndarray, dec_deg: float) -> np.ndarray:
    """(..., 3) unit vector towards the source in the Earth-fixed frame.

    s = (cos dec cos H, -cos dec sin H, sin dec). ha_hours: Greenwich hour angle(s) in hours, shape (...);
    dec_deg: declination in degrees.
    """
    h = np.asarray(ha_hours, dtype=np.float64) * (np.pi / 12.0)
    dec = math.radians(dec_deg)
    return np.stack(
        [math.cos(dec) * np.cos(h), -math.cos(dec) * np.sin(h), np.full_like(h, math.sin(dec))], axis=-1
    )


def elevation_deg(xyz: np.ndarray, ha_hours: float | np.ndarray, dec_deg: float) -> np.ndarray:
    """Source elevation in degrees seen from geocentric station positions.

    sin(el) = (r / |r|) . s with s from `source_direction`.
    xyz: (S, 3) or (3,) positions in metres; ha_hours: (T,) or scalar Greenwich hour angle in hours.
    Returns (T, S) (dimensions of size one are kept for scalar inputs: (1, S) or (T, 1)).
    """
    r = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    r_hat = r / np.linalg.norm(r, axis=-1, keepdims=True)
    s = source_direction(np.atleast_1d(ha_hours), dec_deg)
    return np.degrees(np.arcsin(np.clip(s @ r_hat.T, -1.0, 1.0)))


def baseline_uvw(
    baseline_xyz: np.ndarray, ha_hours: float | np.ndarray, dec_deg: float, *, wavelength: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, w) in wavelengths of Earth-fixed baselines B = r_t1 - r_t2 (see the module docstring).

    baseline_xyz: (..., 3) baselines in metres; ha_hours: Greenwich hour angle in hours, broadcastable
    against baseline_xyz[..., 0]; dec_deg: declination in degrees; wavelength: metres.
    Returns u, v, w each of the broadcast shape.
    """
    b = np.asarray(baseline_xyz, dtype=np.float64) / wavelength
    bx, by, bz = b[..., 0], b[..., 1], b[..., 2]
    h = np.asarray(ha_hours, dtype=np.float64) * (np.pi / 12.0)
    sin_h, cos_h = np.sin(h), np.cos(h)
    dec = math.radians(dec_deg)
    sin_d, cos_d = math.sin(dec), math.cos(dec)
    u = bx * sin_h + by * cos_h
    v = -bx * sin_d * cos_h + by * sin_d * sin_h + bz * cos_d
    w = bx * cos_d * cos_h - by * cos_d * sin_h + bz * sin_d
    return u, v, w


def thermal_noise(
    sefd1: float | np.ndarray, sefd2: float | np.ndarray, *, bw: float, tint: float
) -> np.ndarray:
    """Stokes-I thermal noise in Jy of one visibility.

    sigma = sqrt(SEFD1 SEFD2 / (2 bw tint)) / 0.88 / sqrt(2): the radiometer noise of one correlation
    product (RR or LL) with two-bit quantisation efficiency 0.88, divided by sqrt(2) because
    I = (RR + LL) / 2 averages two independent products.
    sefd1, sefd2: Jy, broadcast together; bw: bandwidth in Hz; tint: integration time in s.
    """
    product = np.asarray(sefd1, dtype=np.float64) * np.asarray(sefd2, dtype=np.float64)
    return np.sqrt(product / (2.0 * bw * tint)) / _QUANTIZATION_EFFICIENCY / math.sqrt(2.0)


@dataclass(frozen=True)
class UVCoverage:
    """Simulated visibility sampling: one row per (scan, baseline), ordered by time then baseline.

    time: (N,) UT hours; t1, t2: (N,) station names (baseline r_t1 - r_t2); u, v, w: (N,) wavelengths;
    sigma: (N,) Stokes-I thermal noise in Jy.
    """

    time: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    sigma: np.ndarray

    def __len__(self) -> int:
        return int(self.time.shape[0])

    @property
    def uv(self) -> np.ndarray:
        """(N, 2) stacked (u, v) in wavelengths."""
        return np.stack([self.u, self.v], axis=-1)

    @property
    def stations(self) -> list[str]:
        """Names of the stations that appear in at least one baseline, sorted."""
        return sorted(set(self.t1.tolist()) | set(self.t2.tolist()))


def uv_coverage(
    stations: Array | Sequence[Station],
    ra_hours: float,
    dec_deg: float,
    mjd: float,
    *,
    tstart: float = 0.0,
    tstop: float = 24.0,
    tint: float = 60.0,
    tadv: float = 600.0,
    elevmin: float = 10.0,
    elevmax: float = 85.0,
    rf: float = 230e9,
    bw: float = 4e9,
) -> UVCoverage:
    """Baselines and (u, v) sampled by an Earth-rotation observation, with Stokes-I thermal noise.

    Scans start at np.arange(tstart, tstop, tadv / 3600) UT hours. A (scan, baseline) row is kept when
    both stations see the source at an elevation within [elevmin, elevmax] degrees. Baselines are the
    pairs i < j in the order the stations are given.
    stations: an Array or a sequence of at least two Stations; ra_hours: right ascension in hours [0, 24];
    dec_deg: declination in degrees [-90, 90]; mjd: day of observation.
    tstart, tstop: UT hours; tint: integration time per scan in s; tadv: scan cadence in s;
    elevmin, elevmax: degrees; rf: observing frequency in Hz; bw: bandwidth in Hz.
    """
    stations = tuple(stations)
    if len(stations) < 2:
        raise ValueError(f"stations: expected at least 2 stations, got {len(stations)}")
    array = Array(name="stations", stations=stations)
    number(ra_hours, "ra_hours", low=0.0, high=24.0, low_open=False)
    number(dec_deg, "dec_deg", low=-90.0, high=90.0, low_open=False)
    number(mjd, "mjd", low=-math.inf)
    tstart = number(tstart, "tstart", low=-math.inf)
    number(tstop, "tstop", low=tstart)
    for name, value in (("tint", tint), ("tadv", tadv), ("rf", rf), ("bw", bw)):
        positive_float(value, name)
    if not (-90.0 <= elevmin < elevmax <= 90.0):
        raise ValueError(
            f"elevmin, elevmax: expected -90 <= elevmin < elevmax <= 90, got elevmin = {elevmin}, "
            f"elevmax = {elevmax}"
        )

    times = np.arange(tstart, tstop, tadv / 3600.0)
    ha = greenwich_hour_angle(ra_hours, mjd, times)
    el = elevation_deg(array.xyz, ha, dec_deg)
    up = (el >= elevmin) & (el <= elevmax)

    i, j = np.triu_indices(len(array), k=1)
    visible = up[:, i] & up[:, j]
    scan, pair = np.nonzero(visible)
    bi, bj = i[pair], j[pair]
    xyz = array.xyz
    u, v, w = baseline_uvw(xyz[bi] - xyz[bj], ha[scan], dec_deg, wavelength=SPEED_OF_LIGHT / rf)
    names = np.array(array.names)
    sefd = array.sefd
    return UVCoverage(
        time=times[scan],
        t1=names[bi],
        t2=names[bj],
        u=u,
        v=v,
        w=w,
        sigma=thermal_noise(sefd[bi], sefd[bj], bw=bw, tint=tint),
    )


@dataclass(frozen=True)
class UVFitsData:
    """Stokes-I visibilities read from a uvfits file, one row per kept (time, baseline) record.

    u, v: (N,) wavelengths at `freq`; vis: (N,) complex Jy; sigma: (N,) Jy; time: (N,) UT hours since
    0h of day `mjd`; ant1, ant2: (N,) indices into `station_names`; t1, t2: (N,) station names;
    station_names: (S,) names from the antenna table; freq: reference frequency in Hz.
    """

    u: np.ndarray
    v: np.ndarray
    vis: np.ndarray
    sigma: np.ndarray
    time: np.ndarray
    mjd: int
    ant1: np.ndarray
    ant2: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    station_names: np.ndarray
    freq: float

    def __len__(self) -> int:
        return int(self.time.shape[0])

    @property
    def uv(self) -> np.ndarray:
        """(N, 2) stacked (u, v) in wavelengths."""
        return np.stack([self.u, self.v], axis=-1)


_STOKES_RR, _STOKES_LL = -1, -2


def read_uvfits(path: str | Path) -> UVFitsData:
    """Read Stokes-I visibilities I = (RR + LL) / 2 from a random-groups uvfits file (needs astropy).

    Weights are inverse variances, 1 / sigma^2. A channel with weight <= 0 (or non-finite data) is
    flagged. Each polarisation is averaged over IFs and channels with inverse-variance weights; a record
    is dropped when RR or LL has no unflagged channel. Then sigma_I = sqrt(1/W_RR + 1/W_LL) / 2 with W the
    summed weights. (u, v) = (UU, VV) * freq, freq = the FREQ axis reference value plus the mean IF offset
    of the AIPS FQ table. Antennas come from BASELINE = 256 a1 + a2 (+ 0.01 (subarray - 1)) matched to
    NOSTA in the AIPS AN table; subarrays are not told apart.
    path: the uvfits file.
    """
    try:
        from astropy.io import fits
    except ImportError as err:
        raise ImportError(
            "read_uvfits needs astropy; install it with `pip install scoreprior[astro]`"
        ) from err

    with fits.open(path) as hdul:
        groups = hdul[0]
        header = groups.header
        data = np.asarray(groups.data.data, dtype=np.float64)
        # The groups array is (N, NAXIS_last, ..., NAXIS2): FITS axis k sits at array index ndim - k + 1.
        axes = {
            header[f"CTYPE{k}"].strip(): k for k in range(2, header["NAXIS"] + 1) if f"CTYPE{k}" in header
        }
        if not {"STOKES", "COMPLEX", "FREQ"} <= axes.keys():
            raise ValueError(f"path: {path} lacks a STOKES, COMPLEX or FREQ axis (axes {sorted(axes)})")
        k = axes["STOKES"]
        n_stokes = data.shape[data.ndim - k + 1]
        codes = np.rint(
            header[f"CRVAL{k}"] + header[f"CDELT{k}"] * (np.arange(n_stokes) + 1 - header[f"CRPIX{k}"])
        ).astype(int).tolist()
        if _STOKES_RR not in codes or _STOKES_LL not in codes:
            raise ValueError(f"path: {path} lacks RR or LL products (STOKES codes {codes})")
        freq = float(header[f"CRVAL{axes['FREQ']}"])
        if "AIPS FQ" in hdul:
            freq += float(np.mean(hdul["AIPS FQ"].data["IF FREQ"]))
        uu = np.asarray(groups.data.par("UU---SIN"), dtype=np.float64)
        vv = np.asarray(groups.data.par("VV---SIN"), dtype=np.float64)
        jd = np.asarray(groups.data.par("DATE"), dtype=np.float64)
        baseline = np.rint(np.asarray(groups.data.par("BASELINE"), dtype=np.float64)).astype(int)
        antennas = hdul["AIPS AN"].data
        numbers = np.asarray(antennas["NOSTA"], dtype=int).tolist()
        names = np.array([str(n).strip() for n in antennas["ANNAME"]])

    # (N, channels, stokes, re/im/weight) with channels = every IF and frequency channel.
    records = np.moveaxis(
        data, [data.ndim - axes["STOKES"] + 1, data.ndim - axes["COMPLEX"] + 1], [-2, -1]
    ).reshape(len(jd), -1, n_stokes, 3)

    def average(code: int) -> tuple[np.ndarray, np.ndarray]:
        product = records[:, :, codes.index(code), :]
        vis = product[..., 0] + 1j * product[..., 1]
        weight = np.where((product[..., 2] > 0) & np.isfinite(vis), product[..., 2], 0.0)
        total = weight.sum(axis=1)
        weighted = np.where(weight > 0, vis * weight, 0.0).sum(axis=1)
        return weighted / np.where(total > 0, total, 1.0), total

    rr, w_rr = average(_STOKES_RR)
    ll, w_ll = average(_STOKES_LL)
    keep = (w_rr > 0) & (w_ll > 0)
    if not keep.any():
        raise ValueError(f"path: {path} has no record with both RR and LL unflagged")
    index = {number: position for position, number in enumerate(numbers)}
    ant1 = np.array([index[a] for a in (baseline[keep] // 256).tolist()], dtype=int)
    ant2 = np.array([index[a] for a in (baseline[keep] % 256).tolist()], dtype=int)
    mjd = jd[keep] - 2400000.5
    day = int(np.floor(mjd.min()))
    return UVFitsData(
        u=uu[keep] * freq,
        v=vv[keep] * freq,
        vis=0.5 * (rr[keep] + ll[keep]),
        sigma=0.5 * np.sqrt(1.0 / w_rr[keep] + 1.0 / w_ll[keep]),
        time=(mjd - day) * 24.0,
        mjd=day,
        ant1=ant1,
        ant2=ant2,
        t1=names[ant1],
        t2=names[ant2],
        station_names=names,
        freq=freq,
    )


def average_visibilities(data: UVFitsData, seconds: float, *, gap: float = 60.0) -> UVFitsData:
    """Coherent time average of uvfits visibilities, per baseline, in windows within scans.

    Records are visited in time order; a new window starts when `seconds` have passed since the window's
    first record or when more than `gap` seconds separate two records (a scan boundary), so with `seconds`
    longer than a scan the windows are the scans. Each (window, baseline) becomes one row with the
    inverse-variance weighted mean of vis, u and v, sigma = (sum 1/sigma^2)^(-1/2), and the mean time of
    all the window's records (one time stamp per window, shared by its baselines, so closures can be formed).
    Coherent averaging assumes the station phases are stable over a window (calibrated or self-calibrated
    data); it raises the SNR of each row by about sqrt(records per window), which the first-order noise of
    closure quantities needs (it is poor below an SNR of about 3).
    data: from `read_uvfits`; seconds, gap: positive, in seconds.
    """
    positive_float(seconds, "seconds")
    positive_float(gap, "gap")
    stamps, which = np.unique(data.time, return_inverse=True)
    stamp_window = np.zeros(len(stamps), dtype=np.int64)
    start = stamps[0]
    for k in range(1, len(stamps)):
        new = (stamps[k] - start) * 3600.0 >= seconds or (stamps[k] - stamps[k - 1]) * 3600.0 > gap
        stamp_window[k] = stamp_window[k - 1] + new
        start = stamps[k] if new else start
    window = stamp_window[which.reshape(-1)]
    keys = np.stack([window, data.ant1, data.ant2], axis=1)
    unique, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    weight = 1.0 / data.sigma**2
    total = np.bincount(group, weights=weight)

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=weight * values) / total

    vis = mean(data.vis.real) + 1j * mean(data.vis.imag)
    # Every baseline of a window gets the window's mean record time, so closures can be formed per window.
    window_time = np.bincount(window, weights=data.time) / np.bincount(window).clip(min=1)
    time = window_time[unique[:, 0]]
    order = np.lexsort((unique[:, 2], unique[:, 1], time))
    ant1, ant2 = unique[order, 1], unique[order, 2]
    return UVFitsData(
        u=mean(data.u)[order], v=mean(data.v)[order], vis=vis[order], sigma=total[order] ** -0.5,
        time=time[order], mjd=data.mjd, ant1=ant1, ant2=ant2, t1=data.station_names[ant1],
        t2=data.station_names[ant2], station_names=data.station_names, freq=data.freq,
    )


@dataclass(frozen=True)
class ClosureQuantities(ABC):
    """A non-redundant set of closure quantities of one observation, chosen per time stamp.

    value: (K,) observed values; sigma: (K,) their first-order thermal std (eht-imaging's convention,
    sqrt(sum_i sigma_i^2 / |V_i|^2) over the closure's visibilities, sigma_i the per-component std);
    time: (K,) the time stamp of each closure; stations: (K, R) station names; rows: (K, R) indices of
    the visibility rows each closure is made of; signs: (K, R) +1 or -1, how each row enters (see the
    subclasses); row_variance: (K, R) sigma_i^2 / |V_i|^2 of those rows (the first-order variance of a
    visibility's phase, and of its log amplitude).
    """

    value: np.ndarray
    sigma: np.ndarray
    time: np.ndarray
    stations: np.ndarray
    rows: np.ndarray
    signs: np.ndarray
    row_variance: np.ndarray

    def __len__(self) -> int:
        return int(self.value.shape[0])

    @abstractmethod
    def of(self, vis: Tensor) -> Tensor:
        """The closure quantities of model visibilities. vis: (..., N) complex, in the observation's row order
        -> (..., K) real, differentiable."""

    def difference(self, model: Tensor) -> Tensor:
        """value - model as a torch tensor like `model`: (..., K) -> (..., K)."""
        return torch.as_tensor(self.value, dtype=model.dtype, device=model.device) - model

    def covariance(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """First-order thermal covariance, block-diagonal by time stamp: [(indices (k,), C (k, k)), ...].

        C_kl = sum over the rows i shared by closures k and l of s_ki s_li sigma_i^2 / |V_i|^2 (closures of
        one time stamp share baselines, e.g. the reference station's, so they are correlated); the diagonal
        is sigma^2.
        """
        blocks = []
        for t in np.unique(self.time):
            index = np.flatnonzero(self.time == t)
            rows, signs, var = self.rows[index], self.signs[index], self.row_variance[index]
            used = np.unique(rows)
            design = np.zeros((len(index), len(used)))
            variance = np.zeros(len(used))
            for r in range(rows.shape[1]):
                column = np.searchsorted(used, rows[:, r])
                design[np.arange(len(index)), column] = signs[:, r]
                variance[column] = var[:, r]
            blocks.append((index, (design * variance) @ design.T))
        return blocks


@dataclass(frozen=True)
class ClosurePhases(ClosureQuantities):
    """Closure phases psi = arg(V_ab V_bc V_ca) in radians, in [-pi, pi), of triangles stations = (a, b, c).

    Row k's visibilities enter as V or conj(V): psi = sum_r signs[k, r] arg V[rows[k, r]]
    (V_ba = conj(V_ab) for a row stored as (b, a)). Immune to station phase errors and image shifts.
    """

    def of(self, vis: Tensor) -> Tensor:
        """Closure phases of model visibilities in [-pi, pi). vis: (..., N) complex -> (..., K) radians."""
        phase = torch.angle(vis[..., torch.as_tensor(self.rows, device=vis.device)])
        signs = torch.as_tensor(self.signs, dtype=phase.dtype, device=vis.device)
        return _wrap((phase * signs).sum(-1))

    def difference(self, model: Tensor) -> Tensor:
        """value - model wrapped to [-pi, pi). model: (..., K) radians -> (..., K)."""
        return _wrap(super().difference(model))


@dataclass(frozen=True)
class LogClosureAmplitudes(ClosureQuantities):
    """Log closure amplitudes log(|V_ab| |V_cd| / (|V_ac| |V_bd|)) of quadrangles stations = (a, b, c, d).

    rows = the baselines (ab, cd, ac, bd), signs = (+1, +1, -1, -1). Immune to station amplitude gains
    and to the image's flux scale.
    """

    def of(self, vis: Tensor) -> Tensor:
        """Log closure amplitudes of model visibilities. vis: (..., N) complex -> (..., K)."""
        log_amplitude = vis[..., torch.as_tensor(self.rows, device=vis.device)].abs().log()
        return (log_amplitude * torch.as_tensor(self.signs, dtype=log_amplitude.dtype, device=vis.device)).sum(-1)


def _wrap(phase: Tensor) -> Tensor:
    return torch.remainder(phase + math.pi, 2 * math.pi) - math.pi


def _as_numpy(value: object, name: str, *, dtype: type | None = None) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value) if dtype is None else np.asarray(value, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array with one entry per visibility row, got shape {array.shape}")
    return array


def _closure_rows(time: object, t1: object, t2: object, vis: object, sigma: object) -> tuple[np.ndarray, ...]:
    """Checked numpy copies of the visibility table: time, t1, t2 (str), vis (complex), sigma (float)."""
    time = _as_numpy(time, "time", dtype=np.float64)
    t1, t2 = _as_numpy(t1, "t1").astype(str), _as_numpy(t2, "t2").astype(str)
    vis = _as_numpy(vis, "vis", dtype=np.complex128)
    sigma = _as_numpy(sigma, "sigma", dtype=np.float64)
    for name, array in (("t1", t1), ("t2", t2), ("vis", vis), ("sigma", sigma)):
        if array.shape != time.shape:
            raise ValueError(f"{name}: expected shape {time.shape} like time, got {array.shape}")
    if not np.all(np.isfinite(time)):
        raise ValueError("time: expected finite values")
    if not np.all(np.isfinite(vis)) or np.any(vis == 0):
        raise ValueError("vis: expected finite non-zero visibilities (closure quantities divide by |V|)")
    if not np.all(np.isfinite(sigma) & (sigma > 0)):
        raise ValueError("sigma: expected finite positive per-component noise stds")
    if np.any(t1 == t2):
        raise ValueError(f"t1, t2: a baseline joins a station to itself at row {int(np.flatnonzero(t1 == t2)[0])}")
    return time, t1, t2, vis, sigma


def _station_order(t1: np.ndarray, t2: np.ndarray, stations: Sequence[str] | None) -> dict[str, int]:
    """Priority of each station: the given order, or most visibility rows first (ties by name)."""
    names, counts = np.unique(np.concatenate([t1, t2]), return_counts=True)
    if stations is None:
        order = sorted(names.tolist(), key=lambda n: (-int(counts[names.tolist().index(n)]), n))
    else:
        order = [str(s) for s in stations]
        missing = sorted(set(names.tolist()) - set(order))
        if missing or len(set(order)) != len(order):
            raise ValueError(f"stations: expected distinct names covering every station of t1 and t2, missing {missing}")
    return {name: position for position, name in enumerate(order)}


class _Independent:
    """Greedy selection of linearly independent integer vectors (Gram-Schmidt against those kept)."""

    def __init__(self, dim: int) -> None:
        self.basis = np.zeros((0, dim))

    def add(self, vector: np.ndarray) -> bool:
        residual = vector - self.basis.T @ (self.basis @ vector)
        norm = np.linalg.norm(residual)
        if norm < 1e-8:
            return False
        self.basis = np.vstack([self.basis, residual / norm])
        return True


def _candidates(group: tuple[str, ...]) -> list[tuple[tuple[str, ...], list[tuple[str, str]], list[int]]]:
    """(members, baselines, signs) of the closures of a triangle or quadrangle, stations in priority order."""
    if len(group) == 3:
        a, b, c = group
        return [(group, [(a, b), (b, c), (c, a)], [1, 1, 1])]
    p, q, r, s = group
    return [((a, b, c, d), [(a, b), (c, d), (a, c), (b, d)], [1, 1, -1, -1])
            for a, b, c, d in ((p, q, r, s), (p, q, s, r), (p, r, s, q))]


def _closures(
    time: object, t1: object, t2: object, vis: object, sigma: object, stations: Sequence[str] | None, size: int
) -> tuple[np.ndarray, ...]:
    """(vis, time, stations, rows, signs, row_variance) of the triangles (size 3) or quadrangles (4) kept."""
    time, t1, t2, vis, sigma = _closure_rows(time, t1, t2, vis, sigma)
    priority = _station_order(t1, t2, stations)
    kept: dict[str, list] = {"time": [], "stations": [], "rows": [], "signs": []}
    for t in np.unique(time):
        index = np.flatnonzero(time == t)
        where: dict[tuple[str, str], tuple[int, int]] = {}
        for position, i in enumerate(index):
            pair = (t1[i], t2[i])
            if pair in where:
                raise ValueError(f"t1, t2: baseline {pair[0]}-{pair[1]} appears twice at time {t}; "
                                 "average duplicate records first")
            where[pair], where[pair[::-1]] = (position, 1), (position, -1)
        present = sorted({s for pair in where for s in pair}, key=priority.__getitem__)
        chosen = _Independent(len(index))
        for group in itertools.combinations(present, size):
            for members, pairs, signs in _candidates(group):
                if not all(pair in where for pair in pairs):
                    continue
                rows = [where[pair][0] for pair in pairs]
                # A phase changes sign with the baseline's orientation; an amplitude does not.
                signs = [s * where[pair][1] for s, pair in zip(signs, pairs)] if size == 3 else signs
                vector = np.zeros(len(index))
                np.add.at(vector, rows, signs)
                if chosen.add(vector):
                    kept["time"].append(t)
                    kept["stations"].append(members)
                    kept["rows"].append(index[rows])
                    kept["signs"].append(signs)
    rows = np.array(kept["rows"], dtype=np.int64).reshape(-1, size)
    return (vis, np.array(kept["time"], dtype=np.float64), np.array(kept["stations"], dtype=str).reshape(-1, size),
            rows, np.array(kept["signs"], dtype=np.int64).reshape(-1, size), (sigma[rows] / np.abs(vis[rows])) ** 2)


def closure_phases(
    time: object, t1: object, t2: object, vis: object, sigma: object, *, stations: Sequence[str] | None = None
) -> ClosurePhases:
    """Non-redundant closure phases of a visibility table, with first-order thermal noise.

    Selection: per time stamp (rows with equal `time`), with the stations present ordered by priority
    (`stations`, default: most visibility rows in the whole table first, ties by name), candidates are
    visited in lexicographic order of that priority and kept when linearly independent of those kept.
    With all N(N-1)/2 baselines present this is eht-imaging's reference-station set: the (N-1)(N-2)/2
    triangles through the first (reference) station; with baselines missing, as many independent
    triangles as the baselines present allow. A baseline stored as (t2, t1)
    instead of (t1, t2) gives the same closure phases (its row enters conjugated).
    time: (N,) time stamps (any unit); t1, t2: (N,) station names of each row; vis: (N,) complex, non-zero;
    sigma: (N,) per-component (real or imaginary part) thermal std, in vis's units. numpy or torch.
    stations: optional priority order of the station names.
    Returns a `ClosurePhases`: value in radians in [-pi, pi), sigma = sqrt(sum sigma_i^2 / |V_i|^2).
    """
    vis, time, names, rows, signs, variance = _closures(time, t1, t2, vis, sigma, stations, 3)
    value = np.angle(np.prod(np.where(signs > 0, vis[rows], np.conj(vis[rows])), axis=1))
    value = np.where(value >= np.pi, value - 2 * np.pi, value)
    return ClosurePhases(value=value, sigma=np.sqrt(variance.sum(1)), time=time, stations=names, rows=rows,
                         signs=signs, row_variance=variance)


def log_closure_amplitudes(
    time: object, t1: object, t2: object, vis: object, sigma: object, *, stations: Sequence[str] | None = None
) -> LogClosureAmplitudes:
    """Non-redundant log closure amplitudes of a visibility table, with first-order thermal noise.

    Selection as `closure_phases` (independence in the space of log amplitudes); with all baselines
    present, N(N-3)/2 quadrangles. Each 4-station set offers log(|V_ab||V_cd|/(|V_ac||V_bd|)) for
    (a, b, c, d) = (p, q, r, s), (p, q, s, r), (p, r, s, q), of which two are independent.
    Arguments as `closure_phases`.
    Returns a `LogClosureAmplitudes`: value in natural log, sigma = sqrt(sum sigma_i^2 / |V_i|^2).
    """
    vis, time, names, rows, signs, variance = _closures(time, t1, t2, vis, sigma, stations, 4)
    value = (np.log(np.abs(vis[rows])) * signs).sum(1)
    return LogClosureAmplitudes(value=value, sigma=np.sqrt(variance.sum(1)), time=time, stations=names, rows=rows,
                                signs=signs, row_variance=variance)


def closure_quantities(
    observation: UVCoverage | UVFitsData, vis: object | None = None, *, stations: Sequence[str] | None = None
) -> tuple[ClosurePhases, LogClosureAmplitudes]:
    """Closure phases and log closure amplitudes of a `UVCoverage` (give `vis`) or `UVFitsData` (its vis).

    vis: (N,) complex visibilities in the observation's row order (default: the uvfits data's own), in
    the units of the observation's sigma (per component; Jy for `uv_coverage`'s thermal noise, so scale
    sigma with vis if vis is in other units). stations: priority order (see `closure_phases`).
    """
    if vis is None:
        if not isinstance(observation, UVFitsData):
            raise ValueError("vis: a UVCoverage holds no visibilities; pass vis of shape (N,) = (len(observation),)")
        vis = observation.vis
    columns = (observation.time, observation.t1, observation.t2, vis, observation.sigma)
    return (closure_phases(*columns, stations=stations), log_closure_amplitudes(*columns, stations=stations))
