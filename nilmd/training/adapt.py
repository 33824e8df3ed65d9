"""Learning one house: a shipped checkpoint adapted to a building's own labels (`nilmd adapt`).

One generic model per appliance cannot be right in every house; a few days of the house's own
labels can make it so. For one appliance:

  1. the labelled seconds are cut by time into a *fit* part and a *held-out* part: the newest
     whole days (at least one, or a quarter of them, whichever is more; up to half of them where
     the appliance ran too rarely in the least part; under two days of labels, the newest quarter
     of the labelled seconds) are held out;
  2. the appliance is adapted only if it ran often enough in both parts (MIN_RUNS_FIT and
     MIN_RUNS_HELDOUT, below): a model cannot learn a signature from one run, nor be judged on one;
  3. candidates are made from the shipped checkpoint on the fit part only: the probability
     threshold re-chosen ("threshold"), the two head convolutions fine-tuned ("head"), every
     weight fine-tuned with a small step ("all"); each then has its threshold chosen on the fit part;
  4. every candidate and the shipped model are scored on the held-out part the way the daemon
     serves (each second by its published 60-s state); the best candidate is kept only if it beats
     the shipped model in F1 without a worse daily-energy error (`decide`), else the shipped
     model stays. A candidate never sees the held-out part in training.

Scores are computed by nilmd.training.evaluation (the daemon's own model call), so what is decided
on is what would be served. torch is needed to fine-tune (the "threshold" candidate alone would
not need it, but it is rarely enough: the fourth session's experiments, docs/ADAPTATION.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from nilmd.appliances import ON_THRESHOLD_W
from nilmd.models.checkpoints import Checkpoint
from nilmd.models.model import WaveNILM
from nilmd.models.predictor import Predictor
from nilmd.training import evaluation, metrics
from nilmd.training.datasets import Series
from nilmd.training.realdata import RUN_RULES, runs
from nilmd.training.windows import Windows

DAY = 86400
# Runs needed to adapt: two in the fit part (a signature seen once could be a coincidence with
# another load; seen twice, it is the appliance's), two held out (with one run held out the decision
# is all or nothing on that run).
MIN_RUNS_FIT = 2
MIN_RUNS_HELDOUT = 2
F1_TIE = 0.01          # F1 differences within this are a tie, decided by MAE
MAE_TIE = 0.10         # ... by an MAE lower by more than this fraction: else a tie on both, the shipped model stays
ENERGY_SLACK = 0.05    # a candidate's daily-energy error may exceed the shipped one's by 5 % of the true energy
METHODS = ("threshold", "head", "all")


@dataclass
class AdaptConfig:
    steps: int = 300            # fine-tuning steps per candidate
    batch_size: int = 8
    window: int = 2048          # samples per training window (the first receptive field is context only)
    lr_all: float = 1e-4        # all weights: a small step, the shipped model is the prior
    lr_head: float = 1e-3
    on_fraction: float = 0.4    # windows around the appliance running
    hard_fraction: float = 0.3  # windows around something else as big
    interval: int = 60          # the daemon's INFERENCE_INTERVAL: what is scored is what is published
    daemon_window: int = 1536   # the daemon's WINDOW_SIZE: its first interval closes after one full window
    seed: int = 0
    methods: tuple = METHODS
    refit: bool = False         # the kept candidate's recipe trained again on every labelled day (measured)


@dataclass
class Scores:
    f1: float
    mae_w: float
    energy_error: float         # mean over days of |estimated - true| kWh, / the mean true kWh a day
    kwh_per_day_true: float
    kwh_per_day_pred: float
    days: int

    def row(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else round(v, 4) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class Outcome:
    appliance: str
    labelled_days: float
    runs_fit: int
    runs_heldout: int
    shipped: Scores | None = None
    candidates: dict = field(default_factory=dict)   # method -> Scores
    method: str = ""            # the chosen candidate ("" if none was tried)
    kept: bool = False
    why: str = ""
    made: dict = field(default_factory=dict)         # method -> its candidate checkpoint (for evaluation)
    refitted: Checkpoint | None = None               # AdaptConfig.refit: the kept recipe on all the labels
    seconds: float = 0.0

    @property
    def adapted(self) -> Scores | None:
        return self.candidates.get(self.method)

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The adapted checkpoint, when kept."""
        if not self.kept:
            return None
        return self.refitted or self.made.get(self.method)


# -- the labelled data, cut by time ---------------------------------------------------------------
def appliance_series(appliance: str, t0: int, features: np.ndarray, valid: np.ndarray, target: np.ndarray,
                     period_s: int = 1, name: str = "") -> Series:
    """One appliance's labelled stretch: seconds without a label (NaN) are not scored nor learned."""
    ok = valid & np.isfinite(target)
    return Series(name=name or appliance, features=features,
                  targets={appliance: np.nan_to_num(target).astype(np.float32)}, valid=ok, period_s=period_s,
                  info={"start": float(t0)})


def held_out_from(series: Series, appliance: str | None = None) -> int:
    """The first second (index) of the held-out part: the newest whole UTC days of the labels, one
    or a quarter of them, whichever is more; the newest quarter of the seconds under two days.
    Given the appliance, more is held out (newest days, or sixteenths of the seconds, up to half)
    where the least part holds too few of its runs while the rest keeps enough: a washing machine
    that ran 5 times in a week, once in its last two days, is judged on its last three days rather
    than not at all."""
    t0 = int(series.info["start"])
    idx = np.flatnonzero(series.valid)
    if not len(idx):
        return len(series)
    day = (t0 + idx) // DAY
    days = np.unique(day)
    if len(days) < 2:  # the newest quarter of the seconds, up to half, by sixteenths
        at = [int(idx[int(len(idx) * (12 - k) / 16)]) for k in range(5)]
    else:
        least = max(1, math.ceil(len(days) / 4))
        at = [int(days[-hold] * DAY - t0) for hold in range(least, max(least, len(days) // 2) + 1)]
    if appliance is not None:
        on_w = house_on_threshold(series, appliance)
        for a in at:
            fit, held = cut(series, a)
            if count_runs(held, appliance, on_w) >= MIN_RUNS_HELDOUT and count_runs(fit, appliance, on_w) >= MIN_RUNS_FIT:
                return a
    return at[0]


def cut(series: Series, at: int) -> tuple[Series, Series]:
    def part(sl, label):
        start = float(series.info["start"]) + (sl.start or 0)
        return Series(name=f"{series.name} ({label})", features=series.features[sl],
                      targets={a: y[sl] for a, y in series.targets.items()}, valid=series.valid[sl],
                      period_s=series.period_s, info={"start": start})
    return part(slice(0, at), "fit"), part(slice(at, None), "held out")


def count_runs(series: Series, appliance: str, on_w: float | None = None) -> int:
    """Runs by the appliance's run rule (nilmd.training.realdata.RUN_RULES), at its on-threshold."""
    _, min_on, min_off = RUN_RULES[appliance]
    y = np.where(series.valid, series.targets[appliance], 0.0)
    return len(runs(y, (ON_THRESHOLD_W[appliance] if on_w is None else on_w, min_on, min_off)))


def house_on_threshold(series: Series, appliance: str) -> float:
    """What "on" means for this house's appliance. The usual threshold (nilmd.appliances) unless the
    labelled runs draw under 1.25 times it (a 1.7 kW kettle never reaches a 2 kW threshold, so it
    would never be "on"): then half their median power, never under the run rule's own floor."""
    usual = ON_THRESHOLD_W[appliance]
    floor = RUN_RULES[appliance][0]
    y = np.where(series.valid, series.targets[appliance], 0.0)
    running = y[y >= floor]
    if not len(running):
        return usual
    median = float(np.median(running))
    return usual if median >= 1.25 * usual else max(floor, 0.5 * median)


def labelled_days(series: Series) -> float:
    return float(series.valid.sum()) / DAY


# -- scoring as the daemon serves ------------------------------------------------------------------
def score(ckpt: Checkpoint, series: Series, cfg: AdaptConfig, threshold: float | None = None,
          on_w: float | None = None) -> Scores:
    """F1, MAE and daily-energy error of one checkpoint on one stretch, each second scored by the
    state the daemon publishes for its `interval` (evaluation.evaluate, published=True); "on" at
    `on_w` (default: the checkpoint's own on-power threshold)."""
    a = ckpt.appliance
    on_w = ckpt.on_power_threshold_w if on_w is None else on_w
    th = ckpt.probability_threshold if threshold is None else threshold
    pred = Predictor({a: ckpt})
    power, prob, mask = evaluation.predict(pred, series, mode="stream", window=cfg.daemon_window,
                                           interval=cfg.interval)
    block = evaluation.published_blocks(series, cfg.daemon_window, cfg.interval)
    mask &= block >= 0
    raw = {"_power": power[0][mask], "_prob": prob[0][mask], "_true": series.targets[a][mask], "_block": block[mask]}
    s = evaluation.rescore(raw, a, th, on_w)
    # Daily energy: the published (interval-mean) power, summed per UTC day over the scored seconds.
    served = evaluation.interval_mean(evaluation.served_power(raw["_power"], raw["_prob"], th), raw["_block"])
    day = (int(series.info["start"]) + np.flatnonzero(mask)) // DAY
    seen = np.unique(day, return_inverse=True)[1]
    est, true = (np.bincount(seen, weights=w) / 3.6e6 for w in (served, raw["_true"]))
    mean_true = float(true.mean()) if len(true) else float("nan")
    err = float(np.abs(est - true).mean() / mean_true) if len(true) and mean_true > 0 else float("nan")
    return Scores(f1=float(s["f1"]), mae_w=float(s["mae_w"]), energy_error=err, kwh_per_day_true=mean_true,
                  kwh_per_day_pred=float(est.mean()) if len(est) else float("nan"), days=int(len(true)))


def choose_threshold(ckpt: Checkpoint, fit: Series, cfg: AdaptConfig) -> float:
    """The probability threshold with the best F1 on the fit part's published intervals."""
    a = ckpt.appliance
    r = evaluation.evaluate(Predictor({a: ckpt}), [fit], {a: 0.5}, mode="stream", interval=cfg.interval,
                            published=True)[a]
    th, _ = metrics.best_threshold(evaluation.interval_mean(r["_prob"], r["_block"]),
                                   r["_true"] >= ckpt.on_power_threshold_w)
    return float(th)


# -- candidates --------------------------------------------------------------------------------------
def _with(ckpt: Checkpoint, state_dict: dict | None, threshold: float, record: dict,
          on_w: float | None = None) -> Checkpoint:
    out = copy.copy(ckpt)
    if on_w is not None:
        out.on_power_threshold_w = float(on_w)
    if state_dict is not None:
        out.state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    out.probability_threshold = float(threshold)
    out.training = {**ckpt.training, "adapted": record}
    return out


def fine_tune(ckpt: Checkpoint, fit: Series, method: str, cfg: AdaptConfig) -> dict:
    """The shipped weights trained further on the fit part: the heads only, or every weight.
    L1 or squared error on power as the checkpoint was trained (its `training.config.power_loss`),
    plus BCE on on/off, gaps and unlabelled seconds masked out."""
    a, on_w = ckpt.appliance, ckpt.on_power_threshold_w
    model: WaveNILM = ckpt.model().train()
    for name, p in model.named_parameters():
        p.requires_grad_(method == "all" or name.startswith("head."))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr_all if method == "all" else cfg.lr_head, weight_decay=0.0)
    y_all = fit.targets[a][fit.valid]
    running = y_all[y_all >= on_w]
    typical_w = float(running.mean()) if len(running) else float(ckpt.max_power_w)
    windows = Windows([fit], a, min(cfg.window, len(fit)), model.config.receptive_field, typical_w, on_w)
    loss_kind = (ckpt.training.get("config") or {}).get("power_loss", "l1")
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        x, y, m = windows.batch(rng, cfg.batch_size, cfg.on_fraction, cfg.hard_fraction, 0.0)
        x = torch.from_numpy(x).transpose(1, 2)
        y, m = torch.from_numpy(y), torch.from_numpy(m)
        if not m.any():
            continue
        power, logit = model(x)
        err = ((power - y) / typical_w)[m]
        l_power = err.abs().mean() if loss_kind == "l1" else err.square().mean()
        l_on = F.binary_cross_entropy_with_logits(logit[m], (y[m] >= on_w).float())
        lr = (cfg.lr_all if method == "all" else cfg.lr_head) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        (l_power + l_on).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return model.eval().state_dict()


def decide(shipped: Scores, cand: Scores) -> tuple[bool, str]:
    """Keep a candidate only if it beats the shipped model on the held-out days in F1 (a tie, within
    F1_TIE, goes to an MAE lower by more than MAE_TIE: a few held-out runs move MAE by several per
    cent either way) and its daily-energy error is not worse (ENERGY_SLACK)."""
    f1_s, f1_c = _num(shipped.f1), _num(cand.f1)
    e_s, e_c = shipped.energy_error, cand.energy_error
    if not math.isnan(e_c) and not math.isnan(e_s) and e_c > e_s + ENERGY_SLACK:
        return False, f"daily energy error {e_c:.0%} against the shipped {e_s:.0%}"
    if f1_c > f1_s + F1_TIE:
        return True, f"F1 {f1_c:.2f} against {f1_s:.2f}"
    if f1_c >= f1_s - F1_TIE:
        tie = f"F1 tie ({f1_c:.2f}/{f1_s:.2f}), MAE {cand.mae_w:.1f} against {shipped.mae_w:.1f} W"
        if cand.mae_w < (1 - MAE_TIE) * shipped.mae_w:
            return True, tie
        return False, f"{tie}: not lower by more than {MAE_TIE:.0%}"
    return False, f"F1 {f1_c:.2f} not above the shipped {f1_s:.2f}"


def _num(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _better(a: tuple[str, Scores], b: tuple[str, Scores]) -> tuple[str, Scores]:
    (_, sa), (_, sb) = a, b
    if abs(_num(sa.f1) - _num(sb.f1)) > F1_TIE:
        return a if _num(sa.f1) > _num(sb.f1) else b
    return a if sa.mae_w <= sb.mae_w else b


def adapt_appliance(ckpt: Checkpoint, series: Series, cfg: AdaptConfig, progress=None,
                    base_sha256: str = "") -> Outcome:
    """One appliance of one building: the whole procedure of the module docstring."""
    t_start = time.process_time()
    a = ckpt.appliance
    torch.manual_seed(cfg.seed)
    fit, held = cut(series, held_out_from(series, a))
    on_w = house_on_threshold(fit, a)
    ckpt = copy.copy(ckpt)  # the shipped model, judged by what "on" means in this house
    ckpt.on_power_threshold_w = on_w
    out = Outcome(a, labelled_days(series), count_runs(fit, a, on_w), count_runs(held, a, on_w))
    tick = progress or (lambda: None)
    if out.runs_fit < MIN_RUNS_FIT or out.runs_heldout < MIN_RUNS_HELDOUT:
        out.why = (f"ran {out.runs_fit} times in the fit part and {out.runs_heldout} in the held-out part; "
                   f"needs {MIN_RUNS_FIT} and {MIN_RUNS_HELDOUT}")
        out.seconds = time.process_time() - t_start
        return out
    out.shipped = score(ckpt, held, cfg)
    tick()
    made = {}
    for method in cfg.methods:
        record = {"method": method, "base_sha256": base_sha256, "seed": cfg.seed, "on_power_threshold_w": on_w,
                  "steps": 0 if method == "threshold" else cfg.steps}
        state = None if method == "threshold" else fine_tune(ckpt, fit, method, cfg)
        trial = _with(ckpt, state, ckpt.probability_threshold, record)
        trial = _with(trial, None, choose_threshold(trial, fit, cfg), record)
        made[method] = trial
        out.candidates[method] = score(trial, held, cfg)
        tick()
    best = None
    for method, s in out.candidates.items():
        best = (method, s) if best is None else _better(best, (method, s))
    out.method = best[0]
    out.made = made
    out.kept, out.why = decide(out.shipped, best[1])
    if out.kept and cfg.refit and out.method != "threshold":
        record = {**made[out.method].training["adapted"], "refit": True}
        trial = _with(ckpt, fine_tune(ckpt, series, out.method, cfg), ckpt.probability_threshold, record)
        out.refitted = _with(trial, None, choose_threshold(trial, series, cfg), record)
        tick()
    out.seconds = time.process_time() - t_start
    return out
