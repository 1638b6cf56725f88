"""A run directory's shared machinery: checkpoints, the metrics log, the driver's progress bar
and the PNG curves. Every trainer (``train``, ``tune``, ``pformer``) writes the same layout:

```
RUN/config.toml            what was run (the trainer's own config)
RUN/metrics.jsonl          one JSON object per logged step (rank 0), appended and flushed
RUN/tb/                    the same scalars for TensorBoard
RUN/plots/*.png            curves of loss, learning rate and logit scale
RUN/checkpoints/step_0000500/
  model.safetensors        the trainable weights
  optimizer.pt             the optimiser state
  state.json               step, epoch, batches consumed in that epoch, config, ...
```

Checkpoints follow nanoGPT: one explicit dict of state, written atomically (a temp folder
renamed into place), so a checkpoint is complete or absent and a killed save costs nothing.
torch, matplotlib and rich are imported inside the functions: ``import store`` stays cheap.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from store.progress import Bar

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
NAN_FILE = "nan.json"  # a worker's record of a non-finite loss: {"step", "loss", ...}


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step_{step:07d}"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint (temp directories of a killed save are ignored)."""
    root = Path(run) / CHECKPOINTS
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(run: Path, model, optimizer, state: dict, keep: int = 3) -> Path:
    """Write ``model``'s state dict, ``optimizer``'s and ``state`` (must hold ``step``) as
    RUN/checkpoints/step_N; keeps the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    final = checkpoint_dir(run, state["step"])
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint is either complete or absent
    for old in sorted((Path(run) / CHECKPOINTS).glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer=None, device="cpu") -> dict:
    """Load a checkpoint's weights into ``model`` (and ``optimizer``); returns its state."""
    import torch
    from safetensors.torch import load_file

    model.load_state_dict(load_file(Path(path) / "model.safetensors", device=str(device)))
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(Path(path) / "optimizer.pt", map_location=device, weights_only=True)
        )
    return json.loads((Path(path) / "state.json").read_text())


# --- metrics ---------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """Every complete line of a metrics.jsonl (a line cut by a kill is left out)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """RUN/metrics.jsonl (appended, flushed per line) and TensorBoard, on rank 0 only.

    A resumed run repeats the steps after its checkpoint: their old lines are dropped first,
    so the log never holds a step twice.

    This log is the one way metrics leave a worker: the loops never call
    ``ray.train.report``, which nothing here reads (the driver's bar follows this file, a
    sweep reads it after the run) and which waits for Ray Train's controller to collect the
    previous report at its next poll (every 2 s by default): logging every step, a 40-step
    demo training took 99.4 s with reports and 26.7 s without (2 cores, same losses).
    """

    def __init__(self, run: Path, enabled: bool, after_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = Path(run) / METRICS_FILE
        if path.is_file():
            keep = [json.dumps(m) for m in read_metrics(path) if m["step"] <= after_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.jsonl = path.open("a")
        self.tb = SummaryWriter(str(Path(run) / "tb"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step" and v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, metrics["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def metrics_info(m: dict) -> str:
    """The progress bar's text for one metrics row: loss, throughput (when logged), lr."""
    parts = [f"loss {m['loss']:.4f}"]
    for key, unit in (("images_per_s", "img/s"), ("samples_per_s", "samples/s")):
        if m.get(key) is not None:
            parts.append(f"{m[key]:.0f} {unit}")
    if m.get("lr") is not None:
        parts.append(f"lr {m['lr']:.2e}")
    return "  ".join(parts)


class ProgressTail:
    """The driver's progress bar: rank 0 of a Ray Train run appends to metrics.jsonl in the
    run folder, a thread here follows that file (nothing travels back through Ray)."""

    def __init__(
        self,
        path: Path,
        total: int,
        enabled: bool,
        label: str = "train",
        info: Callable[[dict], str] = metrics_info,
    ):
        self.path, self.enabled, self.info = Path(path), enabled, info
        self.stop = threading.Event()
        self.bar = Bar(label, total, enabled, info="starting Ray workers…")
        if enabled:
            self.thread = threading.Thread(target=self._follow, daemon=True)
            self.thread.start()

    def _follow(self) -> None:
        offset = 0
        while not self.stop.wait(0.5):
            try:
                if self.path.stat().st_size < offset:
                    offset = 0  # a resumed run rewrote the log shorter (MetricsLog): start over
                with self.path.open("rb") as f:
                    f.seek(offset)
                    lines = f.readlines()
                    offset = f.tell()
            except OSError:
                continue
            for line in lines:
                if not line.endswith(b"\n"):  # rank 0 is mid-write: read it again next time
                    offset -= len(line)
                    break
                try:
                    m = json.loads(line)
                    self.bar.update(completed=m["step"], info=self.info(m))
                except (ValueError, KeyError, TypeError):
                    continue  # a line the bar cannot show must never stop the bar

    def close(self) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.bar.close()


# --- running the workers ---------------------------------------------------------------------


def fit_workers(
    worker_loop: Callable[[dict], None],
    loop_config: dict,
    run: Path,
    options,
    steps: int,
    *,
    progress: bool,
    failed: Callable[[str], Exception],
    label: str = "train",
    info: Callable[[dict], str] = metrics_info,
) -> dict | None:
    """Run ``worker_loop(loop_config)`` on ``options.workers`` Ray Train workers, with the
    driver's progress bar following ``run``'s metrics log, and return the record a worker left
    in ``run/NAN_FILE`` when its loss stopped being finite (None when training finished).

    ``options`` is a trainer's run options (``workers``, ``cpus_per_worker``,
    ``gpus_per_worker``, ``max_failures``); Ray must be up (``store.cluster.init_ray``). A
    failure Ray could not recover from (restarts exhausted) is raised as
    ``failed(one_line_cause)``: Ray's own report is pages long and hides the cause.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from store.cluster import ray_failure_cause

    run = Path(run)
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = options.gpus_per_worker
    trainer = TorchTrainer(
        _in_directory(worker_loop, os.getcwd()),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=options.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="ray",
            storage_path=str(run),
            failure_config=FailureConfig(max_failures=options.max_failures),
        ),
    )
    bar = ProgressTail(run / METRICS_FILE, steps, progress, label, info)
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors: say what failed, in one line
        raise failed(ray_failure_cause(e)) from None
    finally:
        bar.close()
    nan = run / NAN_FILE
    return json.loads(nan.read_text()) if nan.is_file() else None


def _in_directory(worker_loop: Callable[[dict], None], cwd: str) -> Callable[[dict], None]:
    """``worker_loop`` run from the driver's working directory where that exists (a local Ray,
    or a node with the same folder). Ray Train starts each worker in its own artifacts folder
    under /tmp/ray, so a relative path in a config (``--out demo-out`` gives the demo a model
    ``demo-out/model``) would name nothing there, and an unfound model folder reads as a hub id:
    ``tune`` and ``caption-lm`` then asked huggingface.co for ``demo-out/model``."""

    def in_directory(config: dict) -> None:
        if os.path.isdir(cwd):
            os.chdir(cwd)
        worker_loop(config)

    return in_directory


# --- plots ---------------------------------------------------------------------------------------

PLOTTED = (("loss", "training loss"), ("lr", "learning rate"), ("logit_scale", "logit scale"))


def plot_metrics(metrics_file: Path, out: Path, keys=PLOTTED) -> list[Path]:
    """PNG curves of a run's metrics, for humans: one file per (key, title) that was logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []
    for key, title in keys:
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, values)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
