"""Appliance signatures for the simulated building: one small function per appliance, each
returning one run of it as 1 Hz arrays of active power P (W) and reactive power Q (var).

Numbers come from docs/DESIGN.md §7 ("Appliance signatures") and were tuned against real 1-minute
REFIT / UK-DALE data with scripts/calibrate.py. numpy only: the daemon's test mode imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# tan(phi) for a power factor: an inductive load's reactive power is P * tan(phi).
def q_of(pf: float) -> float:
    return float(np.tan(np.arccos(pf)))


@dataclass(frozen=True)
class ApplianceParams:
    """One appliance as one house owns and uses it (drawn per house from the house's seed)."""

    power: float                    # rated running power at the house's mean voltage (W)
    rate: float = 0.0               # uses (runs, sessions) per day
    hours: np.ndarray = None        # 24 weights: in which hour of the day a use starts
    q_ratio: float = 0.0            # Q / P of the main load (0 resistive, ~0.6 motors)
    d_ratio: float = 0.0            # distortion power / P (switch-mode supplies: PF ~0.6, Q small)
    v_exp: float = 0.0              # P ∝ V^v_exp: 2 for resistive elements, ~0 for regulated supplies
    shape: dict = field(default_factory=dict)  # signature-specific knobs (below)


def motor_start(n: int, p_ss, p_peak, lam: float) -> np.ndarray:
    """Motor inrush: P(t) = P_ss + (P_peak - P_ss) * exp(-lam * t)."""
    return p_ss + (p_peak - p_ss) * np.exp(-lam * np.arange(n))


def thermostat(rng, n: int, on_s, off_s) -> np.ndarray:
    """0/1 mask of an element cycled by a thermostat: alternating on/off spells of jittered length."""
    mask = np.zeros(n)
    t = 0
    while t < n:
        on = int(rng.uniform(0.7, 1.3) * on_s)
        mask[t : t + on] = 1.0
        t += on + int(rng.uniform(0.7, 1.3) * off_s)
    return mask


def motor_tumble(rng, n: int, p_motor: float, q_ratio: float):
    """Washing-machine drum: ~12 s turns with pauses, each turn starting with an inrush."""
    p = np.zeros(n)
    t = 0
    while t < n:
        on = int(rng.integers(8, 16))
        p[t : t + on] = motor_start(on, p_motor, 2.5 * p_motor, 0.8)[: n - t]
        t += on + int(rng.integers(3, 7))
    return p, p * q_ratio


def _jitter(rng, seconds: float, rel: float = 0.15) -> int:
    return max(1, int(seconds * rng.uniform(1 - rel, 1 + rel)))


# ---------------------------------------------------------------------------- event appliances
def kettle(rng, a: ApplianceParams):
    n = int(rng.uniform(*a.shape["seconds"]))  # how full it is
    p = a.power * np.linspace(1.0, 0.97, n)     # element resistance rises as it heats
    return p, p * a.q_ratio


def microwave(rng, a: ApplianceParams):
    n = int(np.clip(rng.lognormal(np.log(a.shape["median_s"]), 0.6), 20, 900))
    p = np.full(n, a.power)
    if rng.random() < a.shape["p_partial"]:
        # reduced power levels cycle the magnetron; the fan, lamp and turntable stay on
        period, duty = int(rng.integers(20, 32)), rng.uniform(0.3, 0.7)
        p[(np.arange(n) % period) >= duty * period] = a.shape["idle_w"]
    return p, p * a.q_ratio


def _phases(rng, program, heater_w, pump_w, pump_q):
    """Concatenate (minutes, heater on?, pump/motor watts) phases -> P, Q."""
    ps, qs = [], []
    for minutes, heat, motor in program:
        n = _jitter(rng, minutes * 60)
        pm = motor_start(n, motor * pump_w, 3.0 * motor * pump_w, 0.5) if motor else np.zeros(n)
        ph = np.full(n, heater_w * heat)
        ps.append(pm + ph)
        qs.append(pm * pump_q)
    return np.concatenate(ps), np.concatenate(qs)


def dishwasher(rng, a: ApplianceParams):
    # programs: (minutes, heater on, pump on) phases; the drying phase draws almost nothing
    program = a.shape["programs"][rng.integers(len(a.shape["programs"]))]
    p, q = _phases(rng, program, a.power, a.shape["pump_w"], a.q_ratio)
    return p + 2.0, q  # control electronics while the program runs


def washing_machine(rng, a: ApplianceParams):
    prog = a.shape["programs"][rng.integers(len(a.shape["programs"]))]
    motor_w, pq = a.shape["motor_w"], a.q_ratio
    ps, qs = [], []
    for minutes, kind in prog:
        n = _jitter(rng, minutes * 60)
        if kind == "fill":
            p, q = np.full(n, 15.0), np.full(n, 5.0)   # valves and electronics
        elif kind == "heat":
            p, q = motor_tumble(rng, n, motor_w, pq)
            p = p + a.power * (np.arange(n) < n - 30)
        elif kind == "wash":
            p, q = motor_tumble(rng, n, motor_w, pq)
        else:  # spin: the motor ramps up to speed and holds
            spin_w = a.shape["spin_w"] * rng.uniform(0.8, 1.1)
            p = spin_w * np.minimum(1.0, np.arange(n) / 60.0 + 0.2)
            p[: min(n, 5)] += 2 * spin_w  # inrush
            q = p * pq
        ps.append(p + 5.0)  # electronics
        qs.append(q)
    return np.concatenate(ps), np.concatenate(qs)


def dryer(rng, a: ApplianceParams):
    n = _jitter(rng, a.shape["minutes"] * 60, 0.3)
    cool = min(n // 4, 600)  # ends with a cool-down: drum turning, element off
    heat = np.ones(n)
    # late in the cycle the load is dry and the thermostat starts cycling the element
    late = int(0.6 * (n - cool))
    heat[late : n - cool] = thermostat(rng, n - cool - late, 90, 60)
    heat[n - cool :] = 0.0
    motor = motor_start(n, a.shape["motor_w"], 4 * a.shape["motor_w"], 0.5)
    return heat * a.power + motor, motor * a.shape["motor_q"]


def oven(rng, a: ApplianceParams):
    n = _jitter(rng, a.shape["minutes"] * 60, 0.35)
    heat = np.ones(n)
    pre = min(n, _jitter(rng, a.shape["preheat_s"]))  # preheat at full power, then the thermostat
    heat[pre:] = thermostat(rng, n - pre, a.shape["on_s"], a.shape["off_s"])
    p = heat * a.power + a.shape["fan_w"]
    return p, np.full(n, a.shape["fan_w"] * 0.5)


def computer(rng, a: ApplianceParams):
    n = int(np.clip(rng.lognormal(np.log(a.shape["median_s"]), 0.7), 600, 6 * 3600))
    # load changes every 5-120 s: mostly idle, sometimes busy
    k = n // 20 + 2
    lengths = rng.integers(5, 120, k)
    levels = a.shape["idle_w"] + (a.power - a.shape["idle_w"]) * rng.random(k) ** 3
    p = np.repeat(levels, lengths)[:n]
    p = np.concatenate((p, np.full(max(0, n - p.size), a.shape["idle_w"])))
    p[:60] = np.maximum(p[:60], 0.8 * a.power)  # boot
    return p, p * a.q_ratio


def television(rng, a: ApplianceParams):
    n = int(np.clip(rng.lognormal(np.log(a.shape["median_s"]), 0.6), 600, 6 * 3600))
    # picture brightness moves the panel's power by +-15 %
    steps = rng.normal(0, 0.05, n // 4 + 1).cumsum()
    bright = np.clip(np.repeat(steps - steps.mean(), 4)[:n], -0.15, 0.15)
    p = a.power * (1.0 + bright)
    return p, p * a.q_ratio


def block(rng, a: ApplianceParams):
    """A generic unknown load (toaster, hair dryer, vacuum, iron, shower, pump): motor or element."""
    n = int(rng.uniform(*a.shape["seconds"]))
    p_ss = a.power * rng.uniform(0.9, 1.1)
    if a.shape.get("cycle"):
        p = p_ss * thermostat(rng, n, *a.shape["cycle"])
    elif a.q_ratio > 0.2:
        p = motor_start(n, p_ss, 3 * p_ss, 0.3)
    else:
        p = np.full(n, p_ss)
    return p, p * a.q_ratio


# ------------------------------------------------------------------------ cycling appliances
def compressor_run(n: int, a: ApplianceParams):
    """One fridge/freezer/heat-pump compressor run: inrush, then a slow settle to P_ss."""
    p = motor_start(n, a.power, a.shape["peak"] * a.power, a.shape["lam"])
    p = p * (1.0 + 0.12 * np.exp(-np.arange(n) / 300.0))  # warm oil and rising suction pressure
    return p + a.shape.get("aux_w", 0.0), p * a.q_ratio


EVENT_SIGNATURES = {
    "Dishwasher": dishwasher,
    "WashingMachine": washing_machine,
    "Dryer": dryer,
    "ElectricOven": oven,
    "Microwave": microwave,
    "ElectricKettle": kettle,
    "Computer": computer,
    "Television": television,
}
CYCLERS = ("HeatPump", "Freezer", "Refrigerator")
