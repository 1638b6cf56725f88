"""`facetclip sweep`: config validation and trial expansion (pure), leaderboard ranking against
hand-made results (pure), and a 2x2 grid on Ray Tune whose trials are normal run directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from eval.sweep import (
    SweepConfig,
    expand_trials,
    plan_concurrency,
    rank_trials,
    run_sweep,
    trial_configs,
)
from store.errors import InputError

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def data(train_data):
    return train_data


def sweep_toml(synth: Path) -> str:
    """The tiny runs of tests/test_train.py, lr x loss, ranked by held-out image->text R@1."""
    return f"""
[base]
steps = 4
batch_size = 16
num_facets = 3
model.tower = "vit_tiny_patch16_224"
model.tower_kwargs = {{ img_size = 32, patch_size = 8, embed_dim = 32, depth = 1, num_heads = 2 }}
data.image_size = 32
"optim.warmup_steps" = 1
[base.run]
log_every = 1
checkpoint_every = 2

[search]
optim.lr = [1e-3, 1e-2]
loss = ["mp-sigmoid", "clip"]

[sweep]
mode = "grid"
metric = "retrieval.i2t_R@1"
max_concurrent = 2

[eval.retrieval]
task = "retrieval"
data = "{synth / "eval" / "retrieval"}"
"""


# --- config and trials (no Ray) -----------------------------------------------------------------


def test_sweep_toml_is_parsed_expanded_and_checked(data, tmp_path):
    synth, cache = data
    path = tmp_path / "sweep.toml"
    path.write_text(sweep_toml(synth))
    cfg = SweepConfig.from_toml(path)
    assert cfg.base["model.tower_kwargs"] == TINY_VIT  # a free-form table stays whole
    assert cfg.base["run.log_every"] == 1 and cfg.base["optim.warmup_steps"] == 1
    assert cfg.direction == "max"
    trials = expand_trials(cfg)
    assert [t.name for t in trials] == [
        "t000-lr=0.001-loss=mp-sigmoid",
        "t001-lr=0.001-loss=clip",
        "t002-lr=0.01-loss=mp-sigmoid",
        "t003-lr=0.01-loss=clip",
    ]
    configs = trial_configs(cfg, trials, tmp_path / "out", str(synth / "images"), str(cache))
    c = configs["t003-lr=0.01-loss=clip"]
    assert (c.optim.lr, c.loss, c.steps, c.run.checkpoint_every) == (1e-2, "clip", 4, 2)
    assert c.model.tower_kwargs == TINY_VIT
    assert Path(c.out) == tmp_path / "out" / "runs" / "t003-lr=0.01-loss=clip"


def test_every_trials_prompt_options_are_checked_before_ray(data, tmp_path, tiny_model):
    # Two trials alike but for prompt.llm: the second one's LLM is checked too, not skipped as
    # "same model, same loss" (a missing LLM would otherwise surface inside a Ray worker).
    synth, cache = data
    cfg = SweepConfig.from_dict({
        "base": {"loss": "caption-lm", "num_facets": 1, "steps": 2,
                 "prompt.captions": str(synth / "captions.parquet")},
        "search": {"prompt.llm": [str(tiny_model), str(tmp_path / "no-such-llm")]},
    })  # fmt: skip
    with pytest.raises(InputError, match="no-such-llm"):
        trial_configs(cfg, expand_trials(cfg), tmp_path / "out", str(synth / "images"), str(cache))


def test_random_search_draws_are_a_function_of_the_seed():
    d = {
        "search": {
            "optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
            "model.text_head": ["none", "linear"],
            "num_facets": {"distribution": "randint", "low": 2, "high": 5},
        },
        "sweep": {"mode": "random", "num_samples": 20, "seed": 3, "metric": "loss"},
    }
    a, b = expand_trials(SweepConfig.from_dict(d)), expand_trials(SweepConfig.from_dict(d))
    assert a == b and len(a) == 20 and len({t.name for t in a}) == 20
    lrs = [t.params["optim.lr"] for t in a]
    assert all(1e-4 <= lr < 1e-2 for lr in lrs)
    assert min(lrs) < 1e-3 < max(lrs)  # log-uniform: both decades drawn from
    assert {t.params["num_facets"] for t in a} <= {2, 3, 4}
    assert {t.params["model.text_head"] for t in a} == {"none", "linear"}
    other = SweepConfig.from_dict({**d, "sweep": {**d["sweep"], "seed": 4}})
    assert expand_trials(other) != a


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"search": {"optim.lrr": [1e-3]}}, r"\[search\] optim.lrr: unknown field; known: .*lr"),
        ({"search": {"loss": ["clip"]}, "base": {"modell": {"tower": "x"}}}, r"\[base\] modell"),
        ({"search": {"loss": ["clip"]}, "sweep": {"mertic": "loss"}}, r"unknown \[sweep\] field.*mertic"),
        ({"search": {"loss": ["clip"]}, "sweeep": {}}, r"unknown table.*sweeep"),
        ({"search": {"loss": ["clip"]}, "sweep": {"mode": "bayes"}}, "mode must be one of grid, random"),
        ({"search": {"optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}},
         'a distribution needs mode = "random"'),
        ({"search": {"optim.lr": {"distribution": "lognormal", "low": 1, "high": 2}},
          "sweep": {"mode": "random"}}, "distribution = loguniform"),
        ({"search": {"cache": ["a", "b"]}}, "same cache"),
        ({"search": {"loss": ["clip"]}, "sweep": {"metric": "retrieval.i2t_R@1"}},
         r"names the eval 'retrieval', but there is no \[eval.retrieval\]"),
        ({"search": {"loss": ["clip"]}, "sweep": {"metric": "val_loss"}}, "not a training metric"),
        ({"search": {"loss": ["clip"]}, "sweep": {"metric": "ret.i2t_R1"},
          "eval": {"ret": {"task": "retrieval", "data": "d"}}}, "a retrieval eval reports i2t_R@1"),
        ({"search": {"loss": "clip"}}, "expected a list of values or a distribution"),
        ({"search": {"loss": ["clip"]}, "sweep": {"max_concurrent": "2"}}, "must be an integer"),
        ({"search": {"loss": ["clip"]}, "eval": {"ret": {"task": "retrieval", "data": "d", "k": 1}}},
         r"unknown \[eval.ret\] field.*'k'"),
        ({"search": {}}, "is empty"),
    ],
)  # fmt: skip
def test_bad_sweep_configs_name_the_problem(tmp_path, table, message):
    with pytest.raises(InputError, match=message):
        cfg = SweepConfig.from_dict(table)
        trial_configs(cfg, expand_trials(cfg), tmp_path, "images", "cache")


def test_the_cli_prints_a_bad_config_without_a_traceback(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[search]\n"optim.lrr" = [1e-3]\n')
    r = CliRunner().invoke(app, ["sweep", "--config", str(path), "--cache", "c",
                                 "--images", "i", "--out", str(tmp_path / "o")])  # fmt: skip
    assert r.exit_code == 2
    assert "optim.lrr: unknown field" in r.output and "Traceback" not in r.output


def test_concurrency_is_what_the_resources_hold():
    need = {"CPU": 3, "GPU": 1}
    assert plan_concurrency(need, {"CPU": 16, "GPU": 4}, None, 10) == 4  # GPUs bind
    assert plan_concurrency(need, {"CPU": 7, "GPU": 4}, None, 10) == 2  # CPUs bind
    assert plan_concurrency(need, {"CPU": 16, "GPU": 4}, 3, 10) == 3  # the cap binds
    assert plan_concurrency(need, {"CPU": 16, "GPU": 4}, None, 2) == 2  # the trials bind
    with pytest.raises(InputError, match="one trial needs"):
        plan_concurrency(need, {"CPU": 16}, None, 2)


def test_leaderboard_ranks_hand_made_results():
    records = [
        {"name": "a", "params": {"optim.lr": 1e-3}, "metrics": {"r": 0.25, "loss": 0.7}},
        {"name": "b", "params": {"optim.lr": 1e-2}, "metrics": {"r": 0.50, "loss": 0.9}},
        {"name": "c", "params": {"optim.lr": 1e-1}, "metrics": {}, "error": "TrainError: NaN"},
        {"name": "d", "params": {"optim.lr": 1e-4}, "metrics": {"r": 0.25, "loss": 0.6}},
        {"name": "e", "params": {"optim.lr": 1e-5}, "metrics": {"r": math.nan, "loss": 0.5}},
    ]
    best_first = rank_trials(records, "r", "max")
    assert [(r["name"], r["rank"]) for r in best_first] == [
        ("b", 1), ("a", 2), ("d", 3), ("c", None), ("e", None)  # a tie keeps the trials' order
    ]  # fmt: skip
    assert [r["name"] for r in rank_trials(records, "loss", "min")] == ["e", "d", "a", "b", "c"]


# --- on Ray Tune --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_a_2x2_sweep_makes_four_run_directories_and_a_ranked_leaderboard(
    data, tmp_path, ray_shutdown
):
    from store.runs import latest_checkpoint
    from train.config import TrainConfig
    from train.export import load
    from train.loop import prepare_run

    synth, cache = data
    path = tmp_path / "sweep.toml"
    path.write_text(sweep_toml(synth))
    out = tmp_path / "sweep"
    result = run_sweep(SweepConfig.from_toml(path), out, synth / "images", cache, progress=False)
    print((out / "leaderboard.md").read_text())
    print(f"wall time {result.seconds:.0f} s, {result.concurrency} trials at a time")

    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(result.ran) and len(names) == 4
    assert result.concurrency == 2
    board = json.loads((out / "leaderboard.json").read_text())
    values = [t["value"] for t in board["trials"]]
    assert [t["rank"] for t in board["trials"]] == [1, 2, 3, 4]
    assert values == sorted(values, reverse=True)  # ranked, best first
    for t in board["trials"]:  # the value ranked is the one the trial's eval report holds
        report = json.loads((out / "runs" / t["name"] / "eval" / "retrieval.json").read_text())
        assert report["metrics"]["i2t_R@1"] == t["value"]
    md = (out / "leaderboard.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| ") and "`t00" in line]
    assert [r.split("|")[2].strip(" `") for r in rows] == [t["name"] for t in board["trials"]]
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Tune's bookkeeping, one folder per trial, under DIR/tune
    assert set(names) <= {p.name for p in (out / "tune").iterdir() if p.is_dir()}

    # every trial is a normal run directory: export loads it, eval takes it, --resume accepts it
    for name in names:
        run = out / "runs" / name
        assert latest_checkpoint(run).name == "step_0000004"
        assert load(run).meta["step"] == 4
    run = out / "runs" / "t003-lr=0.01-loss=clip"
    r = CliRunner().invoke(app, ["eval", str(run), "--task", "zeroshot",
                                 "--data", str(synth / "eval" / "zeroshot_shape"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["counts"]["classes"] == 9
    resumed, _ = prepare_run(TrainConfig(out=str(run)), resume=True)  # what --resume runs first
    assert (resumed.optim.lr, resumed.loss, resumed.steps) == (1e-2, "clip", 4)

    # a rerun from DIR/sweep.toml (images and cache filled in) finds every trial finished:
    # nothing runs, the same leaderboard comes back
    r = CliRunner().invoke(app, ["sweep", "--config", str(out / "sweep.toml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "0 trial(s) run" in r.output and "4 finished before" in r.output
    again = json.loads((out / "leaderboard.json").read_text())
    assert [t["name"] for t in again["trials"]] == [t["name"] for t in board["trials"]]
    # another sweep in the same DIR is refused
    path.write_text(sweep_toml(synth).replace("[1e-3, 1e-2]", "[1e-3, 3e-3]"))
    with pytest.raises(InputError, match="holds a sweep with other settings"):
        run_sweep(SweepConfig.from_toml(path), out, synth / "images", cache, progress=False)
