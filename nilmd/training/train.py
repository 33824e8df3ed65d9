"""Train WaveNILM v3 checkpoints, one appliance or all, on simulated houses or real CSV files.

  python scripts/train.py --appliance all                          # simulated houses (train seeds)
  python scripts/train.py --appliance ElectricKettle --steps 200   # one appliance
  python scripts/train.py --data csv --csv 'DATA/real-1min/REFIT_*.csv.gz' --appliance all
  python scripts/train.py --appliance all --resume                  # continue after a stop
  python scripts/train.py --appliance Microwave --init checkpoints --seed 2026 --lr 2e-3   # warm start

Every appliance gets the same hyper-parameters (so the daemon can fuse the models). Training state
is saved under --run-dir every --save-every steps; --resume picks it up and gives bit-identical
results, because every batch is drawn from an RNG seeded by (seed, appliance, step) alone. The
checkpoint (the best validation state) is written to --out-dir only when an appliance finishes.
CSV layout: see nilmd/training/datasets.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch
import torch.nn.functional as F

import nilmd
from nilmd.models import checkpoints
from nilmd.training import datasets, evaluation, metrics
from nilmd.training.windows import Mixture, Windows
from nilmd.appliances import APPLIANCES, ON_THRESHOLD_W, checkpoint_filename
from nilmd.errors import CheckpointError
from nilmd.features import SCALES
from nilmd.models.model import WaveNILM, WaveNILMConfig
from nilmd.models.predictor import Predictor

# High-power appliances first: they are the most useful and the quickest to learn.
TRAIN_ORDER = ("ElectricKettle", "HeatPump", "Dryer", "ElectricOven", "Microwave", "Dishwasher",
               "WashingMachine", "Refrigerator", "Freezer", "Television", "Computer")


@dataclass
class TrainConfig:
    appliance: str = "all"
    data: str = "sim"                   # sim | csv | mix (real + semi-synthetic + sim, see nilmd.training.mixture)
    real_dir: str = ""                  # --data mix: the real-data folder (layout: nilmd.training.realdata)
    leave_out: str = ""                 # --data mix: a real house (e.g. REFIT_House2) kept out of training and validation
    mix: str = "real:1,synth:1,sim:0.3" # --data mix: source weights (share of training windows)
    hold_periods: str = "1,2,5,8,10,60" # meter periods the input is held at (one checkpoint for them all)
    hold_fraction: float = 0.5          # share of 1 Hz windows fed held at one of hold_periods
    synth_houses: int = 48              # semi-synthetic training houses per appliance (a quarter as many for validation)
    synth_hours: float = 12.0
    max_1min_files: int = 4             # 1-minute months per real house (evenly spread): memory
    csv: list = field(default_factory=list)      # training files (globs ok), --data csv
    val_csv: list = field(default_factory=list)  # validation files; default: the last training file
    train_houses: int = 40              # simulated: the first N of HOUSE_SEEDS_TRAIN
    train_segments: int = 6             # stretches per house, spread over the year (seasons)
    train_days: float = 1.0             # length of each stretch
    val_houses: int = 5
    val_segments: int = 4
    val_days: float = 1.0
    seed: int = 1337
    steps: int = 3000                   # ~7.5 min per appliance on one CPU thread (0.14 s/step)
    batch_size: int = 8
    window: int = 3072                  # the first receptive_field outputs are left out of the loss
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    grad_clip: float = 1.0
    on_fraction: float = 0.4            # share of windows that contain the appliance running
    hard_fraction: float = 0.3          # share of windows with something else big running (Windows)
    power_only_fraction: float = 0.5    # share of windows fed as a power-only meter would send them
    on_loss_weight: float = 1.0
    power_loss: str = "l1"              # l1 (WaveNILM's MAE) | mse (see train_one)
    channels: int = 16
    depth: int = 10
    head_channels: int = 32
    eval_every: int = 1000
    save_every: int = 100
    threads: int = 1
    device: str = "auto"
    out_dir: str = "checkpoints"
    run_dir: str = "runs/train"
    resume: bool = False
    init: str = ""                      # warm start: a folder of checkpoints (or one file) to continue from
    lookahead: int = 0                  # experiment: outputs describe the state this many s before their newest input
    val_interval: int = 1               # validation scores each second by: its own output (1), or the state published for its N-s interval

    def model_config(self) -> WaveNILMConfig:
        return WaveNILMConfig(channels=self.channels, depth=self.depth, head_channels=self.head_channels)


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(name, action="store_true", default=default)
        elif isinstance(default, list):
            p.add_argument(name, nargs="*", default=default)
        else:
            p.add_argument(name, type=type(default), default=default)
    return TrainConfig(**vars(p.parse_args(argv)))


ROOT = Path(__file__).resolve().parents[2]  # the checkout, for `git describe`
def code_version() -> str:
    try:
        desc = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        desc = ""
    return f"{nilmd.__version__}+{desc}" if desc else nilmd.__version__


# ---------------------------------------------------------------- data

def load_data(cfg: TrainConfig, appliance: str | None = None):
    """-> (train series, validation series, description); for --data mix, of one appliance and as
    {source: [Series]}. Simulated sets are cached under run_dir."""
    if cfg.data == "mix":
        from nilmd.training import mixture
        weights = parse_mix(cfg.mix)
        sources = mixture.build(appliance, cfg.real_dir, cfg.leave_out, weights, Path(cfg.run_dir) / "cache",
                                cfg.seed, synth_houses=cfg.synth_houses, synth_hours=cfg.synth_hours,
                                max_1min_files=cfg.max_1min_files,
                                sim_loader=lambda: load_data(dataclasses.replace(cfg, data="sim")))
        for name, series in sources.train.items():
            print(f"{appliance}: {name}: {len(series)} training series, {sum(map(len, series)) / 86400:.1f} days; "
                  f"{len(sources.val.get(name, []))} validation series", flush=True)
        # Chosen on real data where there is some: the simulator's houses are many and would
        # otherwise decide which step is best for a real house.
        real_val = {k: v for k, v in sources.val.items() if k in ("real", "synth") and v}
        return sources.train, real_val or sources.val, {"source": "mix", "validation": sorted(real_val or sources.val),
                                                        **sources.description}
    if cfg.data == "csv":
        files = sorted(f for pattern in cfg.csv for f in glob.glob(pattern))
        val = sorted(f for pattern in cfg.val_csv for f in glob.glob(pattern)) or files[-1:]
        files = [f for f in files if f not in val]
        if not files:
            raise SystemExit("--data csv needs --csv files (and they must not all be validation files)")
        print(f"reading {len(files)} training and {len(val)} validation CSV files", flush=True)
        desc = {"source": "csv", "train_files": [os.path.basename(f) for f in files],
                "val_files": [os.path.basename(f) for f in val]}
        return [datasets.read_csv(f) for f in files], [datasets.read_csv(f) for f in val], desc
    from nilmd.sim.simulator import HOUSE_SEEDS_TRAIN, HOUSE_SEEDS_VAL
    train_seeds = list(HOUSE_SEEDS_TRAIN)[:cfg.train_houses]
    val_seeds = list(HOUSE_SEEDS_VAL)[:cfg.val_houses]
    desc = {"source": "nilmd.sim.simulator", "simulator_sha256": hashlib.sha256(
                datasets.simulator_source()
            ).hexdigest()[:16], "train_seeds": train_seeds, "train_segments": cfg.train_segments,
            "train_days": cfg.train_days, "val_seeds": val_seeds, "val_segments": cfg.val_segments,
            "val_days": cfg.val_days}
    train = datasets.simulated_cached(Path(cfg.run_dir) / "cache", "train", train_seeds, cfg.train_segments, cfg.train_days)
    val = datasets.simulated_cached(Path(cfg.run_dir) / "cache", "val", val_seeds, cfg.val_segments, cfg.val_days)
    return train, val, desc


def parse_mix(text: str) -> dict[str, float]:
    """'real:1,synth:1,sim:0.3' -> {'real': 1.0, ...}; unknown sources are an error."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition(":")
        if name not in ("real", "synth", "sim"):
            raise SystemExit(f"--mix: unknown source {name!r} (real, synth, sim)")
        out[name] = float(weight or 1.0)
    return out


# ---------------------------------------------------------------- training

def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def lookahead_pairs(power, logit, y, m, lag: int):
    """Pair each output with the truth `lag` samples before it (both ends valid). The power head
    still scales the newest sample's aggregate, so a run ending inside the lag is learnt from
    its on/off logit only: the head is the daemon's, unchanged, so the experiment measures what
    seeing the future buys the state before anything else is rebuilt for it."""
    keep = m[:, lag:] & m[:, :-lag]
    return power[:, lag:], logit[:, lag:], y[:, :-lag], keep


def validate(appliance, model, val, cfg, max_power_w):
    """Validation through the daemon's Predictor (stream mode), with full and power-only inputs.
    The probability threshold is tuned for F1 on both together (one threshold serves both kinds
    of meter). -> (score to maximise, threshold, metrics)."""
    ckpt = checkpoints.Checkpoint(path="<training>", appliance=appliance, config=model.config,
                                  state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                                  feature_scales=tuple(SCALES), on_power_threshold_w=ON_THRESHOLD_W[appliance],
                                  probability_threshold=0.5, max_power_w=max_power_w,
                                  training={"config": {"lookahead": cfg.lookahead}})
    predictor = Predictor({appliance: ckpt})
    kw = dict(mode="stream", interval=cfg.val_interval, published=cfg.val_interval > 1)
    if all(not s.features[:, 4].any() for s in val):  # power-only data (real houses): "full" is the same run
        run = evaluation.evaluate(predictor, val, {appliance: 0.5}, inputs="power", **kw)[appliance]
        runs = {"full": run, "power": run}
    else:
        runs = {inp: evaluation.evaluate(predictor, val, {appliance: 0.5}, inputs=inp, **kw)[appliance]
                for inp in ("full", "power")}
    # With published intervals the threshold meets the interval's mean probability, as in the daemon.
    probs = [evaluation.interval_mean(r["_prob"], r["_block"]) if "_block" in r else r["_prob"] for r in runs.values()]
    th, _ = metrics.best_threshold(np.concatenate(probs),
                                   np.concatenate([r["_true"] >= ON_THRESHOLD_W[appliance] for r in runs.values()]))
    out = {inp: evaluation.rescore(r, appliance, th) for inp, r in runs.items()}
    f1s = [v["f1"] for v in out.values()]
    score = float(np.mean([0.0 if np.isnan(f) else f for f in f1s]))
    return score, th, out


def train_one(cfg: TrainConfig, appliance: str, train, val, data_desc, device) -> Path | None:
    out_path = Path(cfg.out_dir) / checkpoint_filename(appliance)
    state_path = Path(cfg.run_dir) / f"{appliance}.pt"
    index = APPLIANCES.index(appliance)
    mcfg = cfg.model_config()
    skip = mcfg.receptive_field
    sources = train if isinstance(train, dict) else {"data": train}
    weights = parse_mix(cfg.mix) if isinstance(train, dict) else {"data": 1.0}
    train = [s for series in sources.values() for s in series]
    truth = np.concatenate([s.targets[appliance][s.valid] for s in train if appliance in s.targets])
    max_power_w = float(np.ceil(truth.max()))
    running = truth[truth >= ON_THRESHOLD_W[appliance]]
    typical_w = float(np.mean(running)) if len(running) else max_power_w  # also the loss's power unit
    windows = Mixture({name: Windows(series, appliance, cfg.window, skip, typical_w)
                       for name, series in sources.items() if series}, weights)
    hold = (tuple(int(p) for p in cfg.hold_periods.split(",") if p), cfg.hold_fraction)

    torch.manual_seed(cfg.seed * 1000 + index)
    model = WaveNILM(mcfg, SCALES).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, best, t_used, history = 0, None, 0.0, []
    init = warm_start(cfg, appliance, model) if cfg.init else None
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        if {"power_loss": "l1", **st["config"]} != _fingerprint(cfg):  # states saved before power_loss existed
            raise SystemExit(f"{state_path} was made with other settings; move it away or use the same flags")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, best, t_used, history = st["step"], st["best"], st["seconds"], st["history"]
        print(f"{appliance}: resuming at step {step}", flush=True)
        if step >= cfg.steps and _loads(out_path, appliance):
            print(f"{appliance}: already finished ({out_path})", flush=True)
            return out_path

    def save_state():
        checkpoints.save(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                      "best": best, "seconds": t_used, "history": history,
                                      "config": _fingerprint(cfg)})

    from tqdm import tqdm

    def validate_step(best):
        """Score the model as it is now; -> the better of it and `best`."""
        model.eval()
        score, th, val_metrics = validate(appliance, model, val, cfg, max_power_w)
        history.append({"step": step, "score": score, "f1_full": val_metrics["full"]["f1"],
                        "f1_power": val_metrics["power"]["f1"], "mae_w": val_metrics["full"]["mae_w"]})
        tqdm.write(f"{appliance} step {step}: val F1 full {val_metrics['full']['f1']:.3f} "
                   f"power-only {val_metrics['power']['f1']:.3f} MAE {val_metrics['full']['mae_w']:.1f} W "
                   f"(threshold {th:.2f})")
        if best is None or score > best["score"]:
            best = {"score": score, "step": step, "threshold": th, "metrics": val_metrics,
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        return best

    if init and step == 0:  # the starting point is a candidate too: a warm start never makes things worse
        best = validate_step(best)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=cfg.steps, initial=step, desc=appliance, dynamic_ncols=True, mininterval=5)
    ema = None
    t_start = time.time() - t_used
    while step < cfg.steps:
        model.train()
        rng = np.random.default_rng([cfg.seed, index, step])
        x, y, m = windows.batch(rng, cfg.batch_size, cfg.on_fraction, cfg.hard_fraction, cfg.power_only_fraction,
                                hold)
        x = torch.from_numpy(x).to(device).transpose(1, 2)
        y, m = torch.from_numpy(y).to(device), torch.from_numpy(m).to(device)
        power, logit = model(x)
        # L1 on power in units of the appliance's typical running power (WaveNILM's MAE, but so a
        # 100 W TV and a 3 kW kettle learn at the same pace), BCE on on/off at the on-threshold.
        # L1's optimum is the median: where "on" is less likely than not (a fridge among other
        # compressors) it predicts 0 W; mse's optimum is the mean, p(on) x power.
        if cfg.lookahead:  # output t is trained on the truth at t - L: it has seen L s after it
            power, logit, y, m = lookahead_pairs(power, logit, y, m, cfg.lookahead)
        err = ((power - y) / typical_w)[m]
        l_power = err.abs().mean() if cfg.power_loss == "l1" else err.square().mean()
        l_on = F.binary_cross_entropy_with_logits(logit[m], (y[m] >= ON_THRESHOLD_W[appliance]).float())
        loss = l_power + cfg.on_loss_weight * l_on
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", power=f"{l_power.item():.3f}", on=f"{l_on.item():.3f}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            best = validate_step(best)
        if step % cfg.save_every == 0 or step == cfg.steps:
            t_used = time.time() - t_start
            save_state()
    bar.close()

    final = WaveNILM(mcfg, SCALES)
    final.load_state_dict(best["model"])
    training = {"data": data_desc, "seed": cfg.seed, "code_version": CODE_VERSION, "torch": str(torch.__version__),
                "device": str(device), "threads": torch.get_num_threads(), "seconds": round(t_used, 1),
                "best_step": best["step"], "history": history, **({"init": init} if init else {}),
                "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "appliance")},
                "command": "python " + " ".join(["scripts/train.py", *sys.argv[1:]])}
    data = checkpoints.to_dict(appliance, final, on_power_threshold_w=ON_THRESHOLD_W[appliance],
                               probability_threshold=best["threshold"], max_power_w=max_power_w,
                               training=training, metrics={"validation": best["metrics"]})
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    checkpoints.save(out_path, data)
    checkpoints.load(out_path, appliance, lookahead_ok=cfg.lookahead > 0)  # what we wrote must load
    print(f"{appliance}: wrote {out_path} (best step {best['step']}, {t_used / 60:.1f} min)", flush=True)
    return out_path


def warm_start(cfg: TrainConfig, appliance: str, model: WaveNILM) -> dict:
    """Load the weights of an earlier checkpoint (the optimizer starts afresh, the schedule from
    step 0). -> the record of where they came from, so the chain of runs stays reproducible."""
    path = Path(cfg.init)
    if path.is_dir():
        path = path / checkpoint_filename(appliance)
    try:
        ckpt = checkpoints.load(path, appliance, lookahead_ok=True)
    except CheckpointError as exc:
        raise SystemExit(f"--init: {exc}") from None
    widened = dataclasses.replace(ckpt.config, channels=model.config.channels) == model.config \
        and ckpt.config.channels < model.config.channels
    if widened:  # a capacity experiment that keeps what the narrow model learnt (nilmd.training.widen)
        from nilmd.training.widen import widen_into
        widen_into(model, ckpt.state_dict, ckpt.config.channels)
    elif ckpt.config != model.config:
        raise SystemExit(f"--init: {path} has {ckpt.config}, this run {model.config}; use the same "
                         "--depth/--head-channels (--channels may only grow)")
    else:
        model.load_state_dict(ckpt.state_dict)
    print(f"{appliance}: starting from {path}" + (f", widened {ckpt.config.channels} -> "
                                                  f"{model.config.channels} channels" if widened else ""), flush=True)
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "training": ckpt.training}


def _loads(path, appliance) -> bool:
    try:
        checkpoints.load(path, appliance, lookahead_ok=True)
        return True
    except Exception:  # a missing or broken file is rewritten from the saved best state
        return False


def _fingerprint(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run it continues. --steps may grow: that
    continues a finished run (its cosine schedule stretched) to improve it."""
    skip = ("steps", "resume", "appliance", "threads", "device", "out_dir", "run_dir", "eval_every", "save_every")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


CODE_VERSION = None  # taken when training starts: the code that ran, not HEAD when a file is written


def main(argv=None):
    global CODE_VERSION
    cfg = parse_args(argv)
    CODE_VERSION = code_version()
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    names = [a for a in TRAIN_ORDER] if cfg.appliance == "all" else cfg.appliance.split(",")
    unknown = [a for a in names if a not in APPLIANCES]
    if unknown:
        raise SystemExit(f"unknown appliance(s) {unknown}; known: {', '.join(APPLIANCES)}")
    shared = load_data(cfg) if cfg.data != "mix" else None  # a mix is built per appliance
    for appliance in names:
        train, val, desc = shared or load_data(cfg, appliance)
        pooled = [s for group in (train.values() if isinstance(train, dict) else [train]) for s in group]
        if not any(appliance in s.targets for s in pooled):
            print(f"{appliance}: not in the training data, skipped", flush=True)
            continue
        if isinstance(val, dict):
            val = [s for group in val.values() for s in group]
        train_one(cfg, appliance, train, val, desc, device)


if __name__ == "__main__":
    main()
