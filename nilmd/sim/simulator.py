"""A simulated building: 1 Hz whole-house meter readings and the true power of each appliance.

    b = Building(seed=1000)
    tr = b.trace(b.start + 3600, 600)     # ten minutes from 01:00 on day 0
    tr.power_total, tr.appliances["ElectricKettle"], list(tr.messages("power"))

Every house is drawn from its seed (ratings, habits, programs, base load, noise), and every
simulated day from (seed, day): any slice of time is reproducible on its own, so training can
read random windows and a producer can stream, and both see the same house. Runs that start
before midnight spill into the next day. Only numpy: the daemon's test mode imports this.
Calibrated against real REFIT / UK-DALE 1-minute data: scripts/calibrate.py,
checkpoints/CALIBRATION.md.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from nilmd.sim.appliance_models import (CYCLERS, EVENT_SIGNATURES, ApplianceParams, block,
                                    compressor_run, q_of)
from nilmd.appliances import APPLIANCES

DAY = 86400
SPILL = 6 * 3600  # the longest run (a TV session, a dryer) that may continue past midnight
HOUSE_SEEDS_TRAIN = tuple(range(1000, 1040))
HOUSE_SEEDS_VAL = tuple(range(2000, 2005))
HOUSE_SEEDS_TEST = tuple(range(3000, 3005))
_EPOCH_DAY_2000 = 10957


def _rng(*key: int) -> np.random.Generator:
    # SeedSequence wants non-negative ints; days before `start` are negative
    return np.random.default_rng([k + (1 << 40) for k in key])


def _hours(rng, bumps, floor=0.01) -> np.ndarray:
    """A house's habit: 24 hourly start probabilities from (hour, weight) bumps, each moved and
    reweighted per house."""
    h = np.arange(24) + 0.5
    w = np.full(24, floor)
    for centre, weight in bumps:
        d = np.abs(h - (centre + rng.normal(0, 0.75)))
        d = np.minimum(d, 24 - d)
        w += weight * rng.lognormal(0, 0.4) * np.exp(-0.5 * (d / rng.uniform(0.8, 1.6)) ** 2)
    return w / w.sum()


# Non-target loads the models must learn to ignore: (name, W, seconds, uses/day, habit bumps,
# Q/P, distortion/P, thermostat (on s, off s), share of houses that have one).
UNKNOWN_LOADS = (
    ("toaster", (800, 1500), (120, 240), (0.1, 0.6), [(8, 1)], 0.0, 0.0, None, 0.7),
    ("hair dryer", (1000, 2000), (120, 480), (0.1, 0.6), [(7.5, 1), (20, 0.3)], 0.1, 0.0, None, 0.6),
    ("vacuum", (700, 1800), (300, 1500), (0.05, 0.3), [(11, 1), (16, 0.5)], 0.45, 0.0, None, 0.9),
    ("iron", (1200, 2400), (900, 2400), (0.05, 0.3), [(19, 1), (10, 0.5)], 0.0, 0.0, (20, 40), 0.5),
    ("shower", (7000, 9500), (300, 720), (0.5, 1.2), [(7.5, 1), (21, 0.4)], 0.0, 0.0, None, 0.35),
    ("hob", (1000, 2000), (600, 2400), (0.2, 0.7), [(18, 1), (12.5, 0.3)], 0.0, 0.0, (40, 40), 0.4),
    ("pump", (60, 400), (60, 1200), (1, 4), [(12, 0.2)], 0.6, 0.0, None, 0.8),
    ("electronics", (20, 150), (600, 7200), (0.5, 2), [(20, 1)], 0.1, 1.2, None, 0.7),
)


@dataclass(frozen=True)
class House:
    appliances: dict          # name -> ApplianceParams, APPLIANCES order
    unknown: tuple            # ApplianceParams of the non-target loads this house has
    occupancy: np.ndarray     # 24 values in [0, 1]: how busy the house is (lights, fridge doors)
    base_w: float             # always-on load (router, standby, boiler electronics)
    lights_w: float           # evening lighting at full occupancy
    noise_w: float            # meter noise (sd, W)
    v_mean: float             # mains voltage around which this house's supply drifts
    hp_winter_duty: float     # heat pump on-fraction in midwinter
    hp_hot_water: float       # chance per day of a hot-water run (all year)
    dryer_after_wash: float   # chance that a wash goes into the dryer
    hp_season_base: float     # longer heating season in colder, leakier houses (see _season)
    defrost_w: float          # frost-free freezer's daily defrost heater (0: not frost-free)


def draw_house(seed: int) -> House:
    r = _rng(seed)
    U = r.uniform
    sm = dict(q_ratio=0.1, d_ratio=q_of(0.6) * 0.95, v_exp=0.0)  # switch mode: PF ~0.6, Q small
    a = {}
    pump_q = q_of(U(0.75, 0.85))
    a["HeatPump"] = ApplianceParams(
        U(1300, 2500), q_ratio=q_of(U(0.85, 0.95)), v_exp=0.5,
        shape=dict(peak=U(1.2, 1.6), lam=U(0.02, 0.08), aux_w=U(40, 100),
                   slot_s=int(U(180, 300) * 60), hw_hour=U(5, 9) if r.random() < 0.6 else U(17, 21)))
    # programs: (minutes, heater on, pump on); pump ~ 60-150 W
    dw_catalogue = [
        [(8, 0, 1), (22, 1, 1), (40, 0, 1), (15, 1, 1), (15, 0, 1), (30, 0, 0)],   # eco, ~130 min
        [(5, 0, 1), (18, 1, 1), (25, 0, 1), (12, 1, 1), (10, 0, 1), (20, 0, 0)],   # normal, ~90
        [(3, 0, 1), (12, 1, 1), (15, 0, 1), (8, 1, 1), (5, 0, 1)],                 # quick, ~43
    ]
    dw_progs = [dw_catalogue[i] for i in sorted(r.choice(3, size=r.integers(1, 3), replace=False))]
    a["Dishwasher"] = ApplianceParams(
        U(1900, 2300), U(0.5, 1.1), _hours(r, [(9.5, 0.25), (14, 0.35), (20.5, 1.0)], 0.002),
        q_ratio=pump_q, v_exp=2.0, shape=dict(programs=dw_progs, pump_w=U(50, 120)))
    wm_catalogue = [
        [(3, "fill"), (15, "heat"), (35, "wash"), (4, "spin"), (10, "wash"), (4, "spin"),
         (12, "wash"), (10, "spin")],                                        # cotton 40, ~95 min
        [(3, "fill"), (8, "heat"), (20, "wash"), (3, "spin"), (8, "wash"), (8, "spin")],
        [(2, "fill"), (20, "wash"), (3, "spin"), (8, "wash"), (6, "spin")],  # cold quick wash
    ]
    wm_progs = [wm_catalogue[i] for i in sorted(r.choice(3, size=r.integers(1, 4), replace=False))]
    a["WashingMachine"] = ApplianceParams(
        U(1800, 2200), U(0.35, 0.8), _hours(r, [(9.5, 1.0), (14, 0.6), (19, 0.15)], 0.002),
        q_ratio=q_of(U(0.7, 0.85)), v_exp=2.0,
        shape=dict(programs=wm_progs, motor_w=U(40, 120), spin_w=U(250, 550)))
    a["Dryer"] = ApplianceParams(
        U(2000, 2700) if r.random() < 0.85 else U(4000, 5500), U(0.15, 0.4),
        _hours(r, [(11, 1.0), (16, 0.8), (20, 0.4)], 0.002), v_exp=2.0,
        shape=dict(minutes=U(50, 110), motor_w=U(150, 300), motor_q=q_of(0.8)))
    a["Freezer"] = ApplianceParams(
        U(80, 150), q_ratio=q_of(U(0.8, 0.9)), v_exp=0.5,
        shape=dict(peak=U(3, 7), lam=U(0.3, 1.0), slot_s=int(U(40, 70) * 60), duty=U(0.3, 0.45)))
    a["Refrigerator"] = ApplianceParams(
        U(85, 135), q_ratio=q_of(U(0.82, 0.9)), v_exp=0.5,
        shape=dict(peak=U(3, 7), lam=U(0.3, 1.0), slot_s=int(U(30, 45) * 60), duty=U(0.22, 0.32)))
    a["ElectricOven"] = ApplianceParams(
        U(2000, 3500), U(0.3, 0.9), _hours(r, [(12.5, 0.2), (18, 1.0)], 0.002), v_exp=2.0,
        shape=dict(minutes=U(30, 80), preheat_s=U(480, 900), on_s=U(30, 90), off_s=U(60, 180),
                   fan_w=U(25, 60)))
    a["Microwave"] = ApplianceParams(
        U(800, 1500), U(1.5, 3.5),
        _hours(r, [(8, 0.5), (12.5, 0.9), (16, 0.3), (18.5, 0.8), (22, 0.2)], 0.01),
        q_ratio=q_of(0.98), v_exp=1.0,
        shape=dict(median_s=U(70, 150), p_partial=U(0.1, 0.5), idle_w=U(60, 120)))
    a["ElectricKettle"] = ApplianceParams(
        U(2300, 3000), U(3.5, 7.5),
        _hours(r, [(8.0, 1.0), (12.5, 0.7), (15.5, 0.6), (19, 0.8), (21.5, 0.25)], 0.002),
        v_exp=2.0, shape=dict(seconds=(75, U(130, 200))))
    wfh = r.random() < 0.4
    a["Computer"] = ApplianceParams(
        U(80, 230), U(1.0, 2.5),
        _hours(r, [(9.5, 1.0), (14, 1.0), (20, 0.5)] if wfh else [(8, 0.2), (19.5, 1.0)], 0.005),
        shape=dict(idle_w=U(30, 70), median_s=U(1, 3) * 3600), **sm)
    a["Television"] = ApplianceParams(
        U(60, 250), U(1.0, 2.5), _hours(r, [(8, 0.15), (15, 0.25), (20, 1.0)], 0.003),
        shape=dict(median_s=U(1, 2.5) * 3600), **sm)

    unknown = []
    for _, pw, secs, rate, bumps, qr, dr, cyc, share in UNKNOWN_LOADS:
        if r.random() < share:
            unknown.append(ApplianceParams(U(*pw), U(*rate), _hours(r, bumps, 0.01), qr, dr,
                                           shape=dict(seconds=secs, cycle=cyc)))
    occ = a["ElectricKettle"].hours + a["Microwave"].hours + a["Television"].hours
    return House({n: a[n] for n in APPLIANCES}, tuple(unknown), occ / occ.max(),
                 base_w=U(40, 130), lights_w=U(15, 100), noise_w=U(0.5, 4.0), v_mean=U(228, 243),
                 hp_winter_duty=U(0.12, 0.3), hp_hot_water=U(0.5, 0.95),
                 dryer_after_wash=U(0.1, 0.6), hp_season_base=U(0.25, 0.55),
                 defrost_w=U(150, 350) if r.random() < 0.5 else 0.0)


def _starts(rng, a: ApplianceParams, scale: float = 1.0) -> np.ndarray:
    """Start seconds within a day of a Poisson number of uses, by the hour-of-day habit."""
    k = rng.poisson(a.rate * scale)
    return np.sort(rng.choice(24, size=k, p=a.hours) * 3600 + rng.integers(0, 3600, k))


def _put(P, Q, s: int, p, q):
    """Place a run at second s; where two runs of one appliance overlap the larger one wins."""
    seg = P[s : s + p.size]
    take = p[: seg.size] > seg
    seg[take] = p[: seg.size][take]
    Q[s : s + p.size][take] = q[: seg.size][take]


def _season(epoch_day: float, base: float = 0.4) -> float:
    """1 in midwinter, 0 from late spring to early autumn (northern hemisphere)."""
    doy = (epoch_day - _EPOCH_DAY_2000) % 365.2425
    return float(np.clip(base + 0.6 * np.cos(2 * np.pi * (doy - 15) / 365.2425), 0.0, 1.0))


@dataclass(frozen=True)
class Trace:
    timestamp: np.ndarray      # float64 epoch seconds, consecutive integer seconds
    power_total: np.ndarray    # float32 W: what the meter reports
    voltage: np.ndarray        # float32 V
    current: np.ndarray        # float32 A: apparent power / voltage
    power_factor: np.ndarray   # float32 in (0, 1]: P / S of the whole house
    appliances: dict           # name -> float32 W, true active power, APPLIANCES order

    def __len__(self) -> int:
        return self.timestamp.shape[0]

    def __getitem__(self, sl: slice) -> "Trace":
        return Trace(self.timestamp[sl], self.power_total[sl], self.voltage[sl], self.current[sl],
                     self.power_factor[sl], {k: v[sl] for k, v in self.appliances.items()})

    def messages(self, fields: str = "full") -> Iterator[dict]:
        """Input samples (docs/CONTRACT.md §3.2), one per second; fields="power" is a power-only meter."""
        if fields not in ("full", "power"):
            raise ValueError(f"fields must be 'full' or 'power', not {fields!r}")
        for i in range(len(self)):
            msg = {"timestamp": float(self.timestamp[i]), "power_total": round(float(self.power_total[i]), 2)}
            if fields == "full":
                msg["voltage"] = round(float(self.voltage[i]), 2)
                msg["current"] = round(float(self.current[i]), 3)
                msg["power_factor"] = round(float(self.power_factor[i]), 4)
            yield msg


class Building:
    """One simulated house. `start` is the epoch of its day 0 at local midnight."""

    def __init__(self, seed: int, start: float = 1704067200.0):
        self.seed = int(seed)
        self.start = float(round(start))
        self.house = draw_house(self.seed)
        # small caches, so that reading consecutive chunks renders each day once (~10 MB)
        self._spill: OrderedDict = OrderedDict()  # day -> its runs' tail past midnight
        self._days: OrderedDict = OrderedDict()   # day -> finished meter arrays

    def trace(self, t0: float, n: int) -> Trace:
        t0 = float(round(t0))
        rel = int(t0 - self.start)
        parts = []
        s = rel
        while s < rel + n:
            d, off = divmod(s, DAY)
            m = min(DAY - off, rel + n - s)
            parts.append((self._day(d), off, off + m))
            s += m
        parts = parts or [(self._day(rel // DAY), 0, 0)]  # n == 0
        cat = lambda k: np.concatenate([p[k][..., a:b] for p, a, b in parts], axis=-1)  # noqa: E731
        apps = cat("apps")
        return Trace(t0 + np.arange(n, dtype=np.float64), cat("p"), cat("v"), cat("i"), cat("pf"),
                     {name: apps[j] for j, name in enumerate(APPLIANCES)})

    # ------------------------------------------------------------------------------- internals
    @staticmethod
    def _cached(cache: OrderedDict, key, make, size=2):
        if key not in cache:
            cache[key] = make(key)
            while len(cache) > size:
                cache.popitem(last=False)
        return cache[key]

    def _epoch_day(self, d: int) -> float:
        return (self.start + d * DAY) / DAY

    def _smooth(self, d: int, stream: int, knot_s: int) -> np.ndarray:
        """Slow unit-variance noise for day d, continuous across midnight (knots from (seed, day))."""
        k = DAY // knot_s
        knots = np.append(_rng(self.seed, d, stream).normal(size=k), _rng(self.seed, d + 1, stream).normal())
        return np.interp(np.arange(DAY), np.arange(k + 1) * knot_s, knots)

    def _render(self, d: int):
        """Runs drawn for day d (they may spill SPILL seconds past midnight): P, Q per appliance,
        and P, Q, D of the non-target loads."""
        h, rng = self.house, _rng(self.seed, d, 1)
        n = DAY + SPILL
        P, Q = np.zeros((len(APPLIANCES), n)), np.zeros((len(APPLIANCES), n))
        other = np.zeros((3, n))
        ix = {name: j for j, name in enumerate(APPLIANCES)}
        weekend = (int(self._epoch_day(d)) + 3) % 7 >= 5
        for name, fn in EVENT_SIGNATURES.items():
            a, j = h.appliances[name], ix[name]
            scale = (0.6 if name == "Computer" else 1.25) if weekend else 1.0
            for s in _starts(rng, a, scale):
                p, q = fn(rng, a)
                _put(P[j], Q[j], s, p, q)
                if name == "WashingMachine" and rng.random() < h.dryer_after_wash:
                    k, dry = ix["Dryer"], EVENT_SIGNATURES["Dryer"]
                    s_dry = s + p.size + int(rng.uniform(120, 2400))  # unloading the washer
                    _put(P[k], Q[k], s_dry, *dry(rng, h.appliances["Dryer"]))
        # compressors on a fixed grid of thermostat slots (absolute time, so no seam at midnight)
        season = _season(self._epoch_day(d), h.hp_season_base)
        for name in CYCLERS:
            a, j = h.appliances[name], ix[name]
            slot = a.shape["slot_s"]
            k0, k1 = -(-d * DAY // slot), -(-(d + 1) * DAY // slot)
            for k in range(k0, k1):
                s = k * slot - d * DAY
                hour = (s // 3600) % 24
                if name == "HeatPump":  # colder nights: a bit more heating demand
                    duty = h.hp_winter_duty * season * (1.3 if hour < 7 or hour >= 22 else 1.0)
                else:                   # door openings while people are about
                    duty = a.shape["duty"] * (0.85 + 0.3 * h.occupancy[hour])
                on = int(duty * slot * rng.uniform(0.75, 1.25))
                if on >= 300:
                    s += int(rng.uniform(0, 0.1) * slot)
                    _put(P[j], Q[j], s, *compressor_run(on, a))
            if name == "HeatPump" and rng.random() < h.hp_hot_water:
                s = int((a.shape["hw_hour"] + rng.normal(0, 0.5)) % 24 * 3600)
                _put(P[j], Q[j], s, *compressor_run(int(rng.uniform(20, 50) * 60), a))
        for u in h.unknown:
            for s in _starts(rng, u):
                p, q = block(rng, u)
                m = min(p.size, n - s)
                other[0, s : s + m] += p[:m]
                other[1, s : s + m] += q[:m]
                other[2, s : s + m] += u.d_ratio * p[:m]
        if h.defrost_w:  # once a day the defrost heater replaces the freezer's compressor
            r2, j = _rng(self.seed, d, 6), ix["Freezer"]
            s, m = int(r2.uniform(0, DAY)), int(r2.uniform(15, 25) * 60)
            P[j, s : s + m], Q[j, s : s + m] = h.defrost_w, 0.0
        return P, Q, other

    def _day(self, d: int) -> dict:
        return self._cached(self._days, d, self._finish)

    def _finish(self, d: int) -> dict:
        """Day d's meter: its own runs, the previous day's spill, base load, voltage, noise."""
        h = self.house
        raw = self._render(d)
        tail = lambda r: tuple(x[:, DAY:].copy() for x in r)  # noqa: E731
        self._cached(self._spill, d, lambda _: tail(raw))
        pP, pQ, pother = self._cached(self._spill, d - 1, lambda k: tail(self._render(k)))
        P, Q, other = (x[:, :DAY] for x in raw)
        for j in range(len(APPLIANCES)):
            _put(P[j], Q[j], 0, pP[j], pQ[j])
        other[:, :SPILL] += pother

        rng = _rng(self.seed, d, 2)
        secs = np.arange(DAY)
        occ = np.interp(secs / 3600.0, np.arange(24) + 0.5, h.occupancy, period=24)
        v = (h.v_mean + 2.0 * self._smooth(d, 3, 600) - 3.0 * occ + rng.normal(0, 0.15, DAY))
        for j, name in enumerate(APPLIANCES):  # resistive elements draw more at higher voltage
            f = (v / h.v_mean) ** h.appliances[name].v_exp
            P[j] *= f
            Q[j] *= f
        always = h.base_w * (1 + 0.1 * self._smooth(d, 4, 1800))
        lights = h.lights_w * occ * (1 + 0.5 * _season(self._epoch_day(d))) \
            * np.clip(0.8 + 0.4 * self._smooth(d, 5, 900), 0.2, None)
        p_true = P.sum(0) + other[0] + always + lights
        q = Q.sum(0) + other[1] + 0.3 * always + 0.1 * lights
        dist = sum(h.appliances[n].d_ratio * P[j] for j, n in enumerate(APPLIANCES)) \
            + other[2] + 0.5 * always + 0.6 * lights
        p = np.maximum(p_true + rng.normal(0, 1, DAY) * (h.noise_w + 0.002 * p_true), 0.0)
        s = np.sqrt(p * p + q * q + dist * dist)
        pf = np.where(s > 1e-6, p / np.maximum(s, 1e-6), 1.0)
        f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
        return {"p": f32(p), "v": f32(v), "i": f32(s / v), "pf": f32(np.clip(pf, 1e-3, 1.0)),
                "apps": f32(P)}
