"""`facetclip sweep`: several training runs against one cache on Ray Tune, and a leaderboard.

```toml
# sweep.toml
[base]                     # any train.toml field, as tables or dotted as in --set
steps = 300
"model.tower" = "vit_tiny_patch16_224"

[search]                   # dotted field -> the values to try
"optim.lr" = [3e-4, 1e-3]                                     # a list: every value (grid)
loss = ["mp-sigmoid", "siglip"]
# "optim.weight_decay" = { distribution = "loguniform", low = 1e-3, high = 0.5 }   # random only

[sweep]
mode = "grid"              # grid: every combination | random: num_samples draws
num_samples = 8            # random: trials (a list is a uniform choice, a distribution a draw)
seed = 0                   # random: the draws are a function of this seed
metric = "retrieval.i2t_R@1"   # "<eval name>.<metric>", or a training metric ("loss")
goal = "max"               # max | min (default: min for *loss, else max)
max_concurrent = 2         # optional cap; resources bound it anyway

[eval.retrieval]           # held-out evals run after each trial (any `facetclip eval` option)
task = "retrieval"
data = "data/synth/eval/retrieval"
```

The trials are expanded here, by a pure function of the config (names and random draws
included), so a rerun of an interrupted sweep finds its trials again: finished ones are read
back, half-trained ones resume from their checkpoint. Ray Tune runs the rest: each Tune trial
is the driver of one ordinary ``train.loop.train`` run (Ray Train workers, run directory,
checkpoints, export), then runs the evals and reports the metrics.

```
DIR/
  sweep.toml             the sweep's config as run (with --images/--cache filled in)
  trials.json            every trial: name and the values it sets
  runs/<trial>/          a normal run directory (+ eval/<name>.*, sweep_result.json)
  tune/                  Ray Tune's bookkeeping
  leaderboard.md .json .png
```
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import numpy as np

from store.errors import FacetclipError, InputError
from store.tomlfile import dump_toml, read_toml
from train.config import TrainConfig

MODES = ("grid", "random")
GOALS = ("max", "min")
DISTRIBUTIONS = ("loguniform", "uniform", "randint")
# Training metrics a sweep can rank by: the last row of a run's metrics.jsonl.
TRAIN_METRICS = ("loss", "loss_i2t", "loss_t2i", "logit_scale", "logit_bias", "images_per_s")
# What each eval task reports that a sweep can rank by (eval.metrics; XM3600's per-language
# numbers are nested and not rankable here).
EVAL_METRICS = {
    "retrieval": tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
    "zeroshot": ("top1", "top5"),
}
# Fields a trial must not vary: one sweep, one cache and image set, one output tree.
FIXED = ("images", "image_cache", "cache", "out", "run.ray_address")
RESULT_FILE = "sweep_result.json"
TRIALS_FILE = "trials.json"


class SweepError(FacetclipError):
    """Every trial of a sweep failed; the message names each trial's error."""


@dataclass
class SweepConfig:
    base: dict = field(default_factory=dict)  # dotted field -> value
    search: dict = field(default_factory=dict)  # dotted field -> list | distribution table
    evals: dict = field(default_factory=dict)  # eval name -> EvalConfig fields (task, data, ...)
    mode: str = "grid"
    num_samples: int = 1
    seed: int = 0
    metric: str = "loss"
    goal: str | None = None  # None: min for a *loss metric, else max
    max_concurrent: int | None = None

    @property
    def direction(self) -> str:
        return self.goal or ("min" if self.metric.endswith("loss") else "max")

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepConfig:
        return cls.from_dict(read_toml(path, "sweep config"))

    @classmethod
    def from_dict(cls, d: dict) -> SweepConfig:
        unknown = sorted(set(d) - {"base", "search", "sweep", "eval"})
        if unknown:
            raise InputError(
                f"unknown table(s) {unknown} in the sweep config; known: base, search, sweep, eval"
            )
        options = dict(d.get("sweep", {}))
        known = [f.name for f in fields(cls) if f.name not in ("base", "search", "evals")]
        bad = sorted(set(options) - set(known))
        if bad:
            raise InputError(f"unknown [sweep] field(s) {bad}; known: {', '.join(known)}")
        cfg = cls(
            base=flatten(d.get("base", {}), search=False),
            search=flatten(d.get("search", {}), search=True),
            # absolute data paths: Tune runs each trial in a working directory of its own
            evals={
                n: {**e, "data": str(Path(e["data"]).resolve())}
                if isinstance(e, dict) and "data" in e
                else e
                for n, e in d.get("eval", {}).items()
            },  # fmt: skip
            **options,
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        sweep = {"mode": self.mode, "num_samples": self.num_samples, "seed": self.seed,
                 "metric": self.metric, "goal": self.direction, "max_concurrent": self.max_concurrent}  # fmt: skip
        return {"base": dict(self.base), "search": dict(self.search), "eval": dict(self.evals),
                "sweep": {k: v for k, v in sweep.items() if v is not None}}  # fmt: skip

    def validate(self) -> None:
        """Checks on the sweep itself; the fields' names and values are checked per trial by
        TrainConfig (``trial_configs``)."""
        from eval.evaluation import EvalConfig

        for name in ("num_samples", "seed", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise InputError(f"[sweep] {name} must be an integer; got {value!r}")
        if self.mode not in MODES:
            raise InputError(f"[sweep] mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.goal is not None and self.goal not in GOALS:
            raise InputError(f"[sweep] goal must be max or min; got {self.goal!r}")
        if self.num_samples < 1:
            raise InputError("[sweep] num_samples must be >= 1")
        if self.mode == "grid" and self.num_samples != 1:
            raise InputError(
                '[sweep] num_samples is for mode = "random"; a grid runs each combination once'
            )
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise InputError("[sweep] max_concurrent must be >= 1")
        if not self.search:
            raise InputError("[search] is empty: name at least one field and the values to try")
        for key, space in self.search.items():
            if key in FIXED:
                raise InputError(
                    f"[search] {key}: a sweep trains every trial on the same {key}; set it once"
                )
            if not isinstance(space, list | dict):
                raise InputError(
                    f"[search] {key}: expected a list of values or a distribution table, got {space!r}"
                )
            if isinstance(space, list):
                if not space:
                    raise InputError(f"[search] {key}: the list of values is empty")
                continue
            if self.mode == "grid":
                raise InputError(
                    f'[search] {key}: a distribution needs mode = "random" (a grid takes a list)'
                )
            dist, low, high = space.get("distribution"), space.get("low"), space.get("high")
            extra = sorted(set(space) - {"distribution", "low", "high"})
            if dist not in DISTRIBUTIONS or extra:
                raise InputError(
                    f"[search] {key}: expected {{ distribution = {' | '.join(DISTRIBUTIONS)}, low = .., high = .. }}, got {space}"
                )
            if (
                not isinstance(low, int | float)
                or not isinstance(high, int | float)
                or not low < high
            ):
                raise InputError(
                    f"[search] {key}: needs numbers low < high, got low={low!r} high={high!r}"
                )
            if dist == "loguniform" and low <= 0:
                raise InputError(f"[search] {key}: loguniform needs low > 0")
        eval_fields = {f.name for f in fields(EvalConfig)} - {"run", "name"}
        for name, e in self.evals.items():
            if not isinstance(e, dict) or not {"task", "data"} <= set(e):
                raise InputError(
                    f"[eval.{name}] needs task and data (and any `facetclip eval` option)"
                )
            bad = sorted(set(e) - eval_fields)
            if bad:
                raise InputError(
                    f"unknown [eval.{name}] field(s) {bad}; known: {', '.join(sorted(eval_fields))}"
                )
        evals, _, key = self.metric.partition(".")
        if key and evals not in self.evals:
            raise InputError(
                f"[sweep] metric {self.metric!r} names the eval {evals!r}, but there is no [eval.{evals}]"
                + (f" (there is: {', '.join(self.evals)})" if self.evals else "")
            )
        if key and key not in EVAL_METRICS.get(self.evals[evals]["task"], (key,)):
            task = self.evals[evals]["task"]
            raise InputError(
                f"[sweep] metric {self.metric!r}: a {task} eval reports {', '.join(EVAL_METRICS[task])}"
            )
        if not key and self.metric not in TRAIN_METRICS:
            raise InputError(
                f"[sweep] metric {self.metric!r} is not a training metric ({', '.join(TRAIN_METRICS)}); "
                'an eval metric is "<eval name>.<metric>", e.g. "retrieval.i2t_R@1"'
            )


def flatten(table: dict, search: bool, prefix: str = "", section=None) -> dict:
    """Nested TOML tables -> dotted keys, descending only into config sections (and, in
    [search], into free-form tables like ``model.tower_kwargs`` down to a list or a
    distribution), so ``[base.optim] lr = 1e-3``, ``optim.lr = 1e-3`` and ``"optim.lr" = 1e-3``
    mean the same."""
    section = TrainConfig() if section is None and not prefix else section
    out = {}
    for key, value in table.items():
        path = prefix + key
        child = _attr(section, key)
        descend = isinstance(value, dict) and (
            is_dataclass(child) or (search and "distribution" not in value)
        )
        if descend:
            out.update(flatten(value, search, path + ".", child))
        else:
            out[path] = value
    return out


def _attr(section, dotted: str):
    for part in dotted.split("."):
        section = getattr(section, part, None) if is_dataclass(section) else None
    return section


# --- trials: a pure function of the config -------------------------------------------------------


@dataclass
class Trial:
    name: str
    params: dict  # dotted field -> value, the values this trial sets


def expand_trials(cfg: SweepConfig) -> list[Trial]:
    """Every trial, in a fixed order: the grid's combinations (the first [search] key varies
    slowest), or ``num_samples`` draws from a generator seeded with ``seed``."""
    keys = list(cfg.search)
    if cfg.mode == "grid":
        combos = [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*cfg.search.values())
        ]
    else:
        rng = np.random.default_rng(cfg.seed)
        combos = [{k: _draw(cfg.search[k], rng) for k in keys} for _ in range(cfg.num_samples)]
    return [Trial(trial_name(i, p), p) for i, p in enumerate(combos)]


def _draw(space, rng: np.random.Generator):
    if isinstance(space, list):
        return space[int(rng.integers(len(space)))]
    low, high = space["low"], space["high"]
    if space["distribution"] == "randint":  # low <= x < high, as numpy and Tune
        return int(rng.integers(low, high))
    if space["distribution"] == "uniform":
        return float(rng.uniform(low, high))
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def trial_name(index: int, params: dict) -> str:
    """``t003-lr=0.001-loss=clip``: the index keeps names unique, the values make them readable
    (each field by its last dotted part unless two fields share it)."""
    last = [k.rsplit(".", 1)[-1] for k in params]
    parts = [f"t{index:03d}"]
    for key, short in zip(params, last, strict=True):
        label = short if last.count(short) == 1 else key
        parts.append(f"{label}={_short(params[key])}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(parts))[:120]


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict | list):
        return "_".join(
            f"{_short(v)}" for v in (value.values() if isinstance(value, dict) else value)
        )
    return str(value)


def trial_configs(
    cfg: SweepConfig, trials: list[Trial], out: Path, images: str = "", cache: str = ""
) -> dict[str, TrainConfig]:
    """Each trial's TrainConfig (its run directory DIR/runs/<name>), checked before Ray starts:
    unknown fields, bad values, facets, loss vs cache, timm names."""
    from train.loop import check_config

    base = TrainConfig().assign(cfg.base, "[base]")
    base.images, base.cache = str(images or base.images), str(cache or base.cache)
    missing = [n for n in ("cache",) if not getattr(base, n)]
    if not base.images and not base.image_cache:
        missing.insert(0, "images")
    if missing:
        raise InputError(f"missing {', '.join('--' + m for m in missing)} (or set them in [base])")
    # absolute: Tune runs each trial in a working directory of its own (heads only: a sweep
    # over heads and losses reads [base] image_cache instead of images)
    for name in ("images", "image_cache", "cache"):
        if getattr(base, name):
            setattr(base, name, str(Path(getattr(base, name)).resolve()))
    configs, checked = {}, {}
    for t in trials:
        c = base.assign(t.params, "[search]")
        c.out = str(out / "runs" / t.name)
        # same model, loss, facets and prompt options: the same checks (building a big tower
        # costs seconds; the image cache is FIXED, the same for every trial)
        key = json.dumps(
            [c.model.__dict__, c.loss, c.num_facets, c.facet_mode, c.facets, c.prompt.__dict__],
            default=str,
            sort_keys=True,
        )
        if key not in checked:
            checked[key] = check_config(c)
        else:
            c.validate()
            c.facets = c.facets or list(checked[key]["vector_names"])
        configs[t.name] = c
    return configs


# --- concurrency --------------------------------------------------------------------------------


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one trial occupies while it runs: its Tune driver (1 CPU, which also runs the evals),
    its Ray Train workers, and 1 CPU of headroom for their Ray Data decode tasks."""
    return {
        "CPU": 1 + cfg.run.workers * cfg.run.cpus_per_worker + 1,
        "GPU": cfg.run.workers * cfg.run.gpus_per_worker,
    }


def plan_concurrency(need: dict, available: dict, cap: int | None, trials: int) -> int:
    """How many trials run at once: as many as the cluster's resources hold, at most ``cap``
    and the number of trials. Ray Train starts a run only when all its workers fit, so more
    trials than fit would only sit waiting."""
    fits = math.inf
    for resource, amount in need.items():
        if amount > 0:
            fits = min(fits, math.floor(available.get(resource, 0) / amount + 1e-9))
    if fits < 1:
        have = {r: available.get(r, 0) for r in need}
        raise InputError(
            f"one trial needs {need} but the Ray cluster has {have}; lower run.workers, "
            "run.cpus_per_worker or run.gpus_per_worker, or join a bigger cluster (run.ray_address)"
        )
    return int(min(fits, cap or fits, trials))


def local_cpus(need_cpu: float, cap: int | None) -> int:
    """Logical CPUs for a local Ray: room for ``cap`` trials, else for as many as the machine's
    cores take workers (more logical CPUs than cores, as train.loop.init_ray does)."""
    workers_cpu = max(1.0, need_cpu - 2)
    trials = cap or max(1, int((os.cpu_count() or 1) // workers_cpu))
    return max(4, math.ceil(trials * need_cpu) + 1)


# --- one trial (inside a Tune trial, or anywhere Ray runs) --------------------------------------


def run_trial(cfg: TrainConfig, evals: dict, params: dict) -> dict:
    """Train (or resume, or skip a finished training), run the evals, write RUN/sweep_result.json;
    returns that record: the trial's params and its final metrics, flat."""
    from eval.evaluation import EvalConfig, evaluate
    from store.runs import METRICS_FILE, latest_checkpoint, read_metrics
    from train.loop import CONFIG_FILE, train

    run = Path(cfg.out)
    t0 = time.perf_counter()
    exported = run / "model" / "config.json"
    done = exported.is_file() and json.loads(exported.read_text())["step"] >= cfg.steps
    if not done:
        resume = (run / CONFIG_FILE).is_file() and latest_checkpoint(run) is not None
        train(cfg, resume=resume, overwrite=not resume, progress=False)
    rows = read_metrics(run / METRICS_FILE)
    last = rows[-1] if rows else {}
    metrics = {
        k: v for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    chance = {}
    for name, options in evals.items():
        e = dict(options)
        e["data"] = Path(e["data"])
        if "templates" in e:
            e["templates"] = tuple(e["templates"])
        report = evaluate(EvalConfig(run=run, name=name, **e))
        for k, v in report.metrics.items():
            if isinstance(v, float):
                metrics[f"{name}.{k}"] = v
        chance.update({f"{name}.{k}": v for k, v in report.chance.items()})
    record = {"name": run.name, "params": params, "metrics": metrics, "chance": chance,
              "run": str(run), "seconds": time.perf_counter() - t0}  # fmt: skip
    tmp = run / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.rename(run / RESULT_FILE)  # present only when the trial is complete
    return record


def _tune_trial(config: dict, specs: dict) -> None:
    """The Tune function trainable: the driver of one training run."""
    from ray import tune

    spec = specs[config["trial"]]
    record = run_trial(TrainConfig.from_dict(spec["config"]), spec["evals"], spec["params"])
    tune.report(record["metrics"])


# --- the sweep ----------------------------------------------------------------------------------


@dataclass
class SweepResult:
    out: Path
    ranked: list[dict]  # leaderboard rows, best first; failed trials last
    ran: list[str]  # trials run now (the others were finished before)
    concurrency: int
    seconds: float
    files: list[Path]


def run_sweep(
    cfg: SweepConfig, out: str | Path, images: str = "", cache: str = "",
    overwrite: bool = False, progress: bool = True,
) -> SweepResult:  # fmt: skip
    """Run every trial not finished yet (Ray Tune, concurrency bounded by resources), then
    write the leaderboard."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    trials = expand_trials(cfg)
    configs = trial_configs(cfg, trials, out, images, cache)
    _claim(out, cfg, trials, configs, overwrite)
    todo = [t for t in trials if not (out / "runs" / t.name / RESULT_FILE).is_file()]
    concurrency, errors = 0, {}
    if todo:
        concurrency, errors = _run_tune(cfg, todo, configs, out, progress)
    records = []
    for t in trials:
        path = out / "runs" / t.name / RESULT_FILE
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            records.append({"name": t.name, "params": t.params, "metrics": {},
                            "error": errors.get(t.name, "no result")})  # fmt: skip
    if all("error" in r for r in records):
        first = records[0]
        raise SweepError(
            f"every one of the {len(records)} trials failed (the first, {first['name']}: "
            f"{first['error']}); runs are in {out / 'runs'}: fix the cause and rerun the same "
            "command to retry them"
        )
    ranked = rank_trials(records, cfg.metric, cfg.direction)
    files = write_leaderboard(out, ranked, cfg.metric, cfg.direction, list(cfg.search))
    return SweepResult(out, ranked, [t.name for t in todo], concurrency,
                       time.perf_counter() - t0, files)  # fmt: skip


def _claim(
    out: Path, cfg: SweepConfig, trials: list[Trial], configs: dict, overwrite: bool
) -> None:
    """DIR holds one sweep: a rerun with the same config continues it; another is refused."""
    first = next(iter(configs.values()))
    listing = json.loads(json.dumps(  # what identifies the sweep, as JSON reads it back
        {"images": first.images, "cache": first.cache,
         "base": {k: v for k, v in cfg.base.items() if k not in ("images", "cache")},
         "evals": cfg.evals, "trials": {t.name: t.params for t in trials}}, default=str))  # fmt: skip
    existing = out / TRIALS_FILE
    if overwrite:
        for name in (
            "runs",
            "tune",
            TRIALS_FILE,
            "sweep.toml",
            "leaderboard.md",
            "leaderboard.json",
            "leaderboard.png",
        ):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    elif existing.is_file():
        if json.loads(existing.read_text()) != listing:
            raise InputError(
                f"{out} holds a sweep with other settings or trials; rerunning the same sweep "
                "continues it. Choose another --out, or pass --overwrite to start over."
            )
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (out / TRIALS_FILE).write_text(json.dumps(listing, indent=1))
    d = cfg.to_dict()
    d["base"].update({"images": first.images, "cache": first.cache})
    (out / "sweep.toml").write_text(dump_toml(d))


def _run_tune(cfg: SweepConfig, todo: list[Trial], configs: dict, out: Path, progress: bool):
    import ray
    from ray import tune

    from train.loop import init_ray

    need = {"CPU": 0.0, "GPU": 0.0}
    for t in todo:
        for r, v in trial_resources(configs[t.name]).items():
            need[r] = max(need[r], v)
    first = configs[todo[0].name]
    init_ray(first, num_cpus=local_cpus(need["CPU"], cfg.max_concurrent))
    concurrency = plan_concurrency(need, ray.cluster_resources(), cfg.max_concurrent, len(todo))
    specs = {
        t.name: {"config": configs[t.name].to_dict(), "evals": cfg.evals, "params": t.params}
        for t in todo
    }
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, specs=specs), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.name for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            trial_name_creator=lambda trial: trial.config["trial"],
            trial_dirname_creator=lambda trial: trial.config["trial"],
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=1 if progress else 0),
    )
    grid = tuner.fit()
    errors = {}
    for result in grid:
        if result.error is not None:
            # Tune wraps the trial's exception with its traceback; the leaderboard wants the
            # exception's own first line
            cause = getattr(result.error, "cause", None) or result.error
            first = (str(cause).strip().splitlines() or [""])[0]
            errors[result.config["trial"]] = f"{type(cause).__name__}: {first}"[:200]
    return concurrency, errors


# --- the leaderboard (pure) ---------------------------------------------------------------------


def rank_trials(records: list[dict], metric: str, goal: str) -> list[dict]:
    """Best first by ``metric`` (``goal`` max or min); ties keep the trials' order. Trials
    without the metric (failed, or a NaN) come last, in their order. Adds ``rank`` (None for
    those) and ``value``."""

    def value(r):
        v = r.get("metrics", {}).get(metric)
        return v if isinstance(v, int | float) and math.isfinite(v) else None

    scored = [r for r in records if value(r) is not None]
    scored.sort(key=lambda r: -value(r) if goal == "max" else value(r))  # stable: ties in order
    rest = [r for r in records if value(r) is None]
    ranked = [{**r, "rank": i + 1, "value": value(r)} for i, r in enumerate(scored)]
    return ranked + [{**r, "rank": None, "value": None} for r in rest]


def leaderboard_markdown(ranked: list[dict], metric: str, goal: str, params: list[str]) -> str:
    lines = [f"# Sweep leaderboard: {metric} ({goal}imised)", ""]
    extra = [] if metric == "loss" else ["loss"]
    head = ["rank", "trial", *params, metric, *(f"final {m}" for m in extra)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranked:
        cells = [str(r["rank"]) if r["rank"] else "–", f"`{r['name']}`"]
        cells += [_cell(r["params"].get(p)) for p in params]
        cells.append(
            _cell(r["value"]) if r["rank"] else f"failed: {r.get('error', 'no ' + metric)}"
        )
        cells += [_cell(r.get("metrics", {}).get(m)) for m in extra]
        lines.append("| " + " | ".join(cells) + " |")
    chance = next((r["chance"][metric] for r in ranked if metric in r.get("chance", {})), None)
    if chance is not None:
        lines += ["", f"Chance level of {metric}: {chance:.3f}."]
    lines += ["", "Each trial's run directory is `runs/<trial>/` (config, metrics, checkpoints, "
              "model/, eval/); `facetclip train --resume`, `facetclip eval` and `train.export.load` take it."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_leaderboard(
    out: Path, ranked: list[dict], metric: str, goal: str, params: list[str]
) -> list[Path]:
    md, js, png = out / "leaderboard.md", out / "leaderboard.json", out / "leaderboard.png"
    md.write_text(leaderboard_markdown(ranked, metric, goal, params))
    js.write_text(
        json.dumps({"metric": metric, "goal": goal, "params": params, "trials": ranked}, indent=1)
    )
    _plot(png, ranked, metric, goal)
    return [md, js, png]


def _plot(path: Path, ranked: list[dict], metric: str, goal: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [r for r in ranked if r["rank"]]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(rows)), dpi=100)
    y = np.arange(len(rows))[::-1]  # best at the top
    bars = ax.barh(
        y, [r["value"] for r in rows], color=["tab:green"] + ["tab:blue"] * (len(rows) - 1)
    )
    ax.bar_label(bars, fmt="%.4g", fontsize=7, padding=2)  # a zero is a label, not a missing bar
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=7)
    chance = next((r["chance"][metric] for r in rows if metric in r.get("chance", {})), None)
    if chance is not None:
        ax.axvline(chance, color="k", linestyle="--", label="chance")
        ax.legend(fontsize=7)
    ax.set_xlabel(metric)
    ax.set_title(f"sweep: {metric} ({goal}imised), best at the top", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_sweep(r: SweepResult, cfg: SweepConfig):
    """What `facetclip sweep` prints: the leaderboard and a line of totals."""
    from rich.console import Group
    from rich.table import Table

    t = Table(title=f"sweep -> {r.out}: {cfg.metric} ({cfg.direction})")
    for col in ("rank", "trial", cfg.metric):
        t.add_column(col)
    for row in r.ranked:
        value = f"{row['value']:.4f}" if row["rank"] else f"failed: {row.get('error', '')}"
        t.add_row(str(row["rank"] or "-"), row["name"], value)
    finished = len(r.ranked) - len(r.ran)
    return Group(t, f"{len(r.ran)} trial(s) run ({r.concurrency} at a time), {finished} finished "
                    f"before; {r.seconds:.0f} s. Leaderboard: {', '.join(str(f) for f in r.files)}")  # fmt: skip
