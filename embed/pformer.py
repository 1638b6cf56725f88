"""`facetclip pformer CAPTIONS --model LLM --out PF`: train a P-Former prompt predictor on
captions alone (papers.md §3; the model is ``embed.pformer_model``).

Objective, equal weights by default, on every step's batch of captions:

(a) reconstruction: the predicted N prompts go ahead of the caption as ``inputs_embeds`` of the
    frozen LLM, cross-entropy on the caption tokens (and EOS);
(b) contrastive: InfoNCE on a 256-d projection of the pooled code, over the global batch. Its
    positives (``views``):
      ``masked`` (default) - two independently masked copies of the same caption (SimCSE-style
                  views; masking 25% of the encoder's input is what BLIText already does).
                  Works on any caption table, needs one extra pass of the small encoder only.
      ``self``  - BLIText's code as published: each code's positive is itself. The diagonal of
                  the similarity matrix is then constant, so the term only pushes captions
                  apart (a uniformity term) and pulls nothing together.
      ``column`` - a second caption of the same image (``pair_column``, e.g. short_caption):
                  codes of a short and a long description of one image are pulled together.
(c) nearest row: MSE of every prompt vector to its nearest row of the LLM's input-embedding
    matrix (the row held fixed).

Runs like ``train``: the driver validates and tokenises the captions once (the same ids
``embed --recipe pformer`` will compute), then Ray Train workers run the step below; the data
order is a pure function of (seed, step, rank), so a restarted worker or ``--resume`` continues
with exactly the batch an uninterrupted run would see. Rank 0 writes metrics (JSONL +
TensorBoard) and checkpoints; at the end the driver plots the metrics and exports the
predictor to ``PF/predictor/`` (safetensors + predictor.json + tokenizer).

    facetclip pformer data/synth/captions.parquet --model models/tiny --out runs/pf --steps 2000
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embed.pformer_model import PREDICTOR_DIR, PredictorConfig
from store.cluster import init_ray
from store.collective import gather_features
from store.config import TomlConfig
from store.errors import FacetclipError, InputError
from store.precision import use_bf16_autocast
from store.runs import (
    METRICS_FILE,
    NAN_FILE,
    MetricsLog,
    fit_workers,
    latest_checkpoint,
    load_checkpoint,
    plot_metrics,
    read_metrics,
    save_checkpoint,
)
from store.tables import CaptionSource, available_columns, iter_caption_batches

CONFIG_FILE = "config.toml"
FAULT_MARKER = ".fault_injected"
VIEWS = ("masked", "self", "column")


class PFormerError(FacetclipError):
    """P-Former training stopped for a reason the user can act on."""


@dataclass
class LossConfig:
    lm: float = 1.0  # (a) reconstruction
    contrastive: float = 1.0  # (b)
    nearest: float = 1.0  # (c)
    views: str = "masked"  # masked | self | column (see the module docstring)
    pair_column: str = ""  # views = "column": the second caption column
    mask_prob: float = 0.25  # encoder input tokens replaced by [MASK] (BLIText: 25%)
    label_smoothing: float = 0.1


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05  # none on 1-D params
    warmup_steps: int = 100
    min_lr: float = 0.0
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: int = 1
    amp: bool = True  # bf16 autocast on GPU and on CPUs with bf16 arithmetic (store.precision)
    checkpoint_every: int = 200
    log_every: int = 10
    max_failures: int = 1
    ray_address: str | None = None
    fault_step: int | None = None  # tests: the last worker SIGKILLs itself once at this step


@dataclass
class PFormerConfig(TomlConfig):
    captions: str = ""
    model: str = ""  # the frozen LLM (folder or hub id)
    out: str = ""
    column: str = "long_caption"
    key_column: str = "key"
    input_format: str = "auto"
    limit: int | None = None  # read only the first N input rows
    val_rows: int = 64  # the last rows read: held out, reconstruction measured on them
    steps: int = 2000
    batch_size: int = 64  # global (split evenly over workers)
    seed: int = 0
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(f"pformer: {what}")

        need(bool(self.captions), "give the captions (CAPTIONS)")
        need(bool(self.model), "give the frozen LLM (--model)")
        need(bool(self.out), "give the output folder (--out)")
        need(1 <= self.steps <= 100_000_000, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        need(self.run.workers >= 1, f"workers must be >= 1, got {self.run.workers}")
        need(
            self.batch_size % self.run.workers == 0,
            f"batch_size {self.batch_size} must be a multiple of workers {self.run.workers}",
        )
        need(self.val_rows >= 0, f"val_rows must be >= 0, got {self.val_rows}")
        need(self.limit is None or self.limit >= 1, "limit must be >= 1")
        need(self.loss.views in VIEWS, f"views must be one of {VIEWS}, got {self.loss.views!r}")
        need(
            self.loss.views != "column" or bool(self.loss.pair_column),
            "views = column needs the second caption column (--pair-column short_caption)",
        )
        need(
            0 <= self.loss.mask_prob < 1, f"mask_prob must be in [0, 1), got {self.loss.mask_prob}"
        )
        for name in ("lm", "contrastive", "nearest"):
            need(getattr(self.loss, name) >= 0, f"loss weight {name} must be >= 0")
        need(self.optim.lr > 0, f"lr must be > 0, got {self.optim.lr}")
        need(self.run.checkpoint_every >= 1 and self.run.log_every >= 1,
             "checkpoint_every and log_every must be >= 1")  # fmt: skip
        self.predictor.validate()


@dataclass
class PFormerResult:
    run: Path
    steps: int
    final_loss: float | None
    val_token_acc: float | None
    seconds: float
    captions_per_s: float
    predictor: Path | None


# The curves worth a PNG (the terms separately: which one moves is the diagnosis).
PLOTTED = (
    ("loss", "training loss (weighted sum)"),
    ("loss_lm", "(a) reconstruction cross-entropy"),
    ("loss_contrastive", "(b) contrastive"),
    ("loss_nearest", "(c) distance to the nearest embedding row (MSE)"),
    ("val_token_acc", "held-out teacher-forced token accuracy"),
    ("lr", "learning rate"),
)


def progress_info(m: dict) -> str:
    """The progress bar's text for one metrics row."""
    return (f"loss {m['loss']:.3f} (lm {m['loss_lm']:.3f})  {m['captions_per_s']:.0f} captions/s  "
            f"lr {m['lr']:.2e}")  # fmt: skip


# --- schedule and data order (pure) -------------------------------------------------------------


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def batch_rows(n: int, batch_size: int, seed: int, step: int, rank: int, world: int) -> np.ndarray:
    """Row indices of worker ``rank``'s share of global batch ``step``: epochs are seeded
    permutations of the ``n`` training rows cut into whole batches (the rest of an epoch is
    dropped), each batch split into ``world`` equal, disjoint slices."""
    per_epoch = n // batch_size
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = batch_size // world
    start = b * batch_size + rank * per_rank
    return order[start : start + per_rank]


# --- the driver ---------------------------------------------------------------------------------


@dataclass
class Ragged:
    """Token id lists of many captions as one flat array + offsets (cheap to ship to workers)."""

    flat: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, rows: list[list[int]]) -> Ragged:
        lengths = np.array([len(r) for r in rows], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter((t for r in rows for t in r), np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, idx) -> list[list[int]]:
        return [self.flat[self.offsets[i] : self.offsets[i + 1]].tolist() for i in idx]


def read_captions(cfg: PFormerConfig) -> tuple[list[str], list[str], dict[str, int]]:
    """(captions, paired captions or [], skipped counts) of the input, in input order."""
    source = CaptionSource(Path(cfg.captions), cfg.input_format, cfg.key_column)
    columns = [cfg.column] + ([cfg.loss.pair_column] if cfg.loss.views == "column" else [])
    found = available_columns(source)
    missing = [c for c in [cfg.key_column, *columns] if c not in found]
    if missing:
        raise InputError(
            f"column(s) {missing} not found in {cfg.captions}; columns found: {', '.join(found)}. "
            "Choose the caption column with --column and the key with --key-column"
        )
    texts, pairs, skipped, read = [], [], {}, 0
    for batch in iter_caption_batches(source, columns):
        for i in range(len(batch.keys)):
            if cfg.limit is not None and read >= cfg.limit:
                break
            read += 1
            row = [batch.columns[c][i] for c in columns]
            if any(t is None or not t.strip() for t in row):
                skipped["empty or null caption"] = skipped.get("empty or null caption", 0) + 1
                continue
            texts.append(row[0])
            if len(row) > 1:
                pairs.append(row[1])
    return texts, pairs, skipped


def prepare_run(
    cfg: PFormerConfig, resume: bool = False, overwrite: bool = False
) -> tuple[PFormerConfig, dict]:
    """Every check that needs no Ray; tokenises the captions; returns the config to run and
    what the workers need (predictor config filled, token ids, LLM facts)."""
    from embed.engine import inspect_model, load_tokenizer, model_fingerprint
    from embed.pformer_model import caption_token_ids, llm_target_ids, new_predictor

    run = Path(cfg.out)
    if resume:
        if not (run / CONFIG_FILE).is_file():
            raise InputError(f"{run} is not a pformer run (no {CONFIG_FILE}); nothing to resume")
        steps = cfg.steps  # 0: the run's own; more: extend it (the cosine then stretches)
        cfg = PFormerConfig.from_toml(run / CONFIG_FILE)
        cfg.out = str(run)
        if steps:
            cfg.steps = steps
    elif run.exists() and any(run.iterdir()) and not overwrite:
        hint = f"continue it with --resume {run}, or " if (run / CONFIG_FILE).is_file() else ""
        raise InputError(
            f"{run} exists and is not empty; {hint}pass --overwrite or choose another --out"
        )
    cfg.validate()

    info = inspect_model(cfg.model)
    llm_tok = load_tokenizer(info.path)  # one line, not transformers' traceback, when absent
    pcfg = PredictorConfig.from_dict(asdict(cfg.predictor))
    model, enc_tok = new_predictor(pcfg, llm_tok, info.hidden_size)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    texts, pairs, skipped = read_captions(cfg)
    need = cfg.batch_size + cfg.val_rows
    if len(texts) < need:
        raise InputError(
            f"{cfg.captions} has {len(texts)} usable captions in column {cfg.column!r}; "
            f"pformer needs at least batch_size + val_rows = {need}"
        )
    enc_ids, counts = caption_token_ids(enc_tok, texts, pcfg.cleanup, pcfg.max_caption_tokens)
    llm_ids = (
        enc_ids
        if pcfg.encoder == "own"
        else caption_token_ids(llm_tok, texts, pcfg.cleanup, pcfg.max_caption_tokens)[0]
    )
    llm_ids = llm_target_ids(llm_tok, llm_ids)
    n_train = len(texts) - cfg.val_rows
    facts = {
        "predictor": asdict(pcfg),
        "llm_path": str(Path(info.path).resolve()),
        "llm_pad_id": int(llm_tok.pad_token_id if llm_tok.pad_token_id is not None else 0),
        "enc_ids": Ragged.of(enc_ids),
        "llm_ids": Ragged.of(llm_ids),
        "pair_ids": Ragged.of(
            caption_token_ids(enc_tok, pairs, pcfg.cleanup, pcfg.max_caption_tokens)[0]
        ) if pairs else None,
        "n_train": n_train,
    }  # fmt: skip
    stats = {
        "captions": len(texts),
        "train_rows": n_train,
        "val_rows": cfg.val_rows,
        "skipped": skipped,
        "truncated": int(sum(c > pcfg.max_caption_tokens for c in counts)),
        "mean_caption_tokens": float(np.mean(counts)),
        "predictor_params": int(n_params),
        "llm": str(info.path),
        "llm_fingerprint": model_fingerprint(info.path),
        "llm_width": info.hidden_size,
    }
    run.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for name in ("checkpoints", "tb", "plots", PREDICTOR_DIR, METRICS_FILE, NAN_FILE,
                     FAULT_MARKER, "ray", "data_stats.json"):  # fmt: skip
            p = run / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    (run / CONFIG_FILE).write_text(cfg.to_toml())
    (run / "data_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    (run / NAN_FILE).unlink(missing_ok=True)
    facts["stats"] = stats
    facts["enc_tokenizer"] = enc_tok
    return cfg, facts


def train_pformer(
    cfg: PFormerConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> PFormerResult:
    """Run (or resume) P-Former training; returns when the predictor is exported."""
    import ray

    t0 = time.perf_counter()
    cfg, facts = prepare_run(cfg, resume=resume, overwrite=overwrite)
    run = Path(cfg.out).resolve()
    enc_tok, stats = facts.pop("enc_tokenizer"), facts.pop("stats")
    init_ray(cfg.run.ray_address, cfg.run.workers * cfg.run.cpus_per_worker)
    data = ray.put({k: facts.pop(k) for k in ("enc_ids", "llm_ids", "pair_ids")})
    info = fit_workers(
        worker_loop, {"config": cfg.to_dict(), "run": str(run), "data": data, **facts}, run,
        cfg.run, cfg.steps, progress=progress, label="pformer", info=progress_info,
        failed=lambda cause: PFormerError(
            f"pformer training failed after {cfg.run.max_failures} restart(s): {cause}. "
            f"Then continue with: facetclip pformer --resume {run}"),
    )  # fmt: skip
    if info is not None:
        raise PFormerError(
            f"loss became {info['loss']} at step {info['step']}; training stopped (last good "
            f"checkpoint: {info['last_checkpoint']}). Try a lower --lr or more warm-up, then "
            f"--resume {run}."
        )
    plot_metrics(run / METRICS_FILE, run / "plots", PLOTTED)
    ckpt = latest_checkpoint(run)
    predictor = export_predictor(run, ckpt, enc_tok, stats) if ckpt else None
    rows = read_metrics(run / METRICS_FILE)
    last = rows[-1] if rows else {}
    val = [r["val_token_acc"] for r in rows if r.get("val_token_acc") is not None]
    return PFormerResult(
        run=run, steps=int(last.get("step", 0)), final_loss=last.get("loss"),
        val_token_acc=val[-1] if val else None, seconds=time.perf_counter() - t0,
        captions_per_s=float(last.get("captions_per_s", 0.0)), predictor=predictor,
    )  # fmt: skip


def render_pformer(r: PFormerResult):
    """A rich table of a finished run, for the command line."""
    from rich.table import Table

    t = Table(title=f"pformer -> {r.run}", show_header=False)
    t.add_row("steps", str(r.steps))
    t.add_row("final loss", f"{r.final_loss:.4f}" if r.final_loss is not None else "-")
    if r.val_token_acc is not None:
        t.add_row("held-out token accuracy (teacher-forced)", f"{r.val_token_acc:.3f}")
    t.add_row("captions/s (last interval)", f"{r.captions_per_s:,.0f}")
    t.add_row("wall time", f"{r.seconds:.0f} s")
    t.add_row("predictor", str(r.predictor))
    return t


def export_predictor(run: Path, ckpt: Path, tokenizer, stats: dict) -> Path:
    """``RUN/predictor/``: the checkpoint's predictor weights, config and tokenizer."""
    from safetensors.torch import load_file

    from embed.pformer_model import PromptPredictor, save_predictor

    state = json.loads((ckpt / "state.json").read_text())
    pcfg = PredictorConfig.from_dict(state["predictor"])
    model = PromptPredictor(pcfg)
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    out = Path(run) / PREDICTOR_DIR
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    info = {k: stats[k] for k in ("llm", "llm_fingerprint", "llm_width")}
    info.update(steps=state["step"], trained_on=state["config"]["captions"],
                column=state["config"]["column"])  # fmt: skip
    save_predictor(tmp, model, tokenizer, info)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# --- the worker ---------------------------------------------------------------------------------


def build_predictor(pcfg: PredictorConfig, pretrained: bool):
    """The predictor of a filled ``pcfg``; an HF encoder starts from its pretrained weights
    when ``pretrained`` (a fresh run), else from its config (weights loaded from a checkpoint)."""
    from embed.pformer_model import HFEncoder, PromptPredictor

    if pcfg.encoder != "own" and pretrained:
        from transformers import AutoModel

        return PromptPredictor(pcfg, HFEncoder(AutoModel.from_pretrained(pcfg.encoder)))
    return PromptPredictor(pcfg)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms or the temperature)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def step_losses(model, llm, table, batch: dict, cfg: PFormerConfig, offset: int) -> dict:
    """The three loss terms of one worker's batch and their weighted sum (the global batch's
    codes enter the contrastive term through ``gather_features``)."""
    from embed.pformer_model import (
        contrastive_loss,
        nearest_row_loss,
        prompted_logits,
        reconstruction_loss,
        shifted_targets,
    )

    out = model(batch["enc_ids"], batch["enc_mask"], batch.get("view_ids"), batch.get("view_mask"))
    logits = prompted_logits(llm, out["prompts"], batch["llm_ids"], batch["llm_mask"])
    lm = reconstruction_loss(logits, shifted_targets(batch["llm_ids"], batch["llm_mask"]))
    positives = out["proj"] if out["view_proj"] is None else out["view_proj"]
    con = contrastive_loss(out["proj"], gather_features(positives), out["temp"], offset,
                           cfg.loss.label_smoothing)  # fmt: skip
    near = nearest_row_loss(out["prompts"], table)
    w = cfg.loss
    return {"loss": w.lm * lm + w.contrastive * con + w.nearest * near, "loss_lm": lm,
            "loss_contrastive": con, "loss_nearest": near, "temp": out["temp"]}  # fmt: skip


def make_batch(data: dict, idx, cfg: PFormerConfig, pcfg: PredictorConfig, pad_id: int,
               gen, device, train: bool = True) -> dict:  # fmt: skip
    """Padded tensors of rows ``idx``: the (masked) encoder input, the second view, the LLM ids."""
    import torch

    from embed.pformer_model import mask_tokens, pad_batch

    enc = [list(pcfg.prefix_ids) + r + list(pcfg.suffix_ids) for r in data["enc_ids"].rows(idx)]
    enc_ids, enc_mask = pad_batch(enc, pcfg.pad_id)
    llm_ids, llm_mask = pad_batch(data["llm_ids"].rows(idx), pad_id)
    batch = {"llm_ids": llm_ids, "llm_mask": llm_mask, "enc_mask": enc_mask}
    prob = cfg.loss.mask_prob if train else 0.0
    batch["enc_ids"] = mask_tokens(enc_ids, enc_mask, pcfg, prob, gen)
    if train and cfg.loss.views == "masked":
        batch["view_ids"], batch["view_mask"] = (
            mask_tokens(enc_ids, enc_mask, pcfg, prob, gen),
            enc_mask,
        )
    elif train and cfg.loss.views == "column":
        pair = [
            list(pcfg.prefix_ids) + r + list(pcfg.suffix_ids) for r in data["pair_ids"].rows(idx)
        ]
        view_ids, view_mask = pad_batch(pair, pcfg.pad_id)
        batch["view_ids"], batch["view_mask"] = (
            mask_tokens(view_ids, view_mask, pcfg, prob, gen),
            view_mask,
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def worker_loop(loop_cfg: dict) -> None:
    """One Ray Train worker. Reads top to bottom: build, resume, then the training step."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    cfg = PFormerConfig.from_dict(loop_cfg["config"])
    pcfg = PredictorConfig.from_dict(loop_cfg["predictor"])
    run = Path(loop_cfg["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    device = ray.train.torch.get_device()
    data = ray.get(loop_cfg["data"])

    # The frozen LLM: eval mode (no dropout), no gradients for its weights; the gradient flows
    # through it into the prompts.
    llm = AutoModelForCausalLM.from_pretrained(loop_cfg["llm_path"]).to(device).eval()
    llm.requires_grad_(False)
    table = llm.get_input_embeddings().weight.detach()

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_predictor(pcfg, pretrained=True)
    state = {"step": 0}
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model)
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    raw = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas)  # fmt: skip
    if ckpt is not None:
        load_checkpoint(ckpt, raw, optimizer, device=device)
    amp = use_bf16_autocast(cfg.run.amp, device)  # GPU, or a CPU with bf16 arithmetic
    warmup = min(cfg.optim.warmup_steps, cfg.steps // 2)
    log = MetricsLog(run, enabled=rank == 0, after_step=state["step"])
    n_train, per_worker = loop_cfg["n_train"], cfg.batch_size // world
    val_idx = np.arange(n_train, len(data["enc_ids"]))
    step = state["step"]
    t_last, captions_since = time.perf_counter(), 0
    while step < cfg.steps:
        # 1. learning rate: warm-up then cosine
        lr = lr_at(step, cfg.steps, warmup, cfg.optim.lr, cfg.optim.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 2. this worker's rows, masks and dropout: pure functions of (seed, step, rank)
        seed = cfg.seed * 1_000_003 + step * 1009 + rank
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        idx = batch_rows(n_train, cfg.batch_size, cfg.seed, step, rank, world)
        batch = make_batch(data, idx, cfg, pcfg, loop_cfg["llm_pad_id"], gen, device)
        # 3. the three terms (the contrastive one over the global batch)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            losses = step_losses(model, llm, table, batch, cfg, rank * per_worker)
        loss = losses["loss"]
        # 4. a NaN/Inf loss stops the run on every worker (the contrastive term is global)
        if not torch.isfinite(loss):
            if rank == 0:
                (run / NAN_FILE).write_text(json.dumps(
                    {"step": step, "loss": float(loss), "last_checkpoint": str(latest_checkpoint(run))}))  # fmt: skip
            return
        # 5. backward, clip, step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        step += 1
        captions_since += per_worker * world

        # 6. metrics (held-out reconstruction at checkpoints), checkpoints, fault injection
        done = step == cfg.steps
        if step % cfg.run.log_every == 0 or done or step % cfg.run.checkpoint_every == 0:
            now = time.perf_counter()
            metrics = {"step": step, "epoch": step * cfg.batch_size // n_train, "lr": lr,
                       **{k: float(v) for k, v in losses.items()},
                       "captions_per_s": captions_since / max(now - t_last, 1e-9)}  # fmt: skip
            if rank == 0 and len(val_idx) and (step % cfg.run.checkpoint_every == 0 or done):
                metrics.update(
                    validate(raw, llm, data, val_idx, cfg, pcfg, loop_cfg["llm_pad_id"], device)
                )
            t_last, captions_since = time.perf_counter(), 0
            log.write(metrics)
        if rank == 0 and (step % cfg.run.checkpoint_every == 0 or done):
            save_checkpoint(run, raw, optimizer, {"step": step, "config": cfg.to_dict(),
                                                  "predictor": asdict(pcfg)})  # fmt: skip
        _maybe_fault(cfg, run, step, rank, world)
    log.close()


def validate(model, llm, data, idx, cfg, pcfg, pad_id: int, device, batch: int = 64) -> dict:
    """Held-out rows, no masking, no dropout: reconstruction loss and teacher-forced token
    accuracy (caption tokens and EOS)."""
    import torch

    from embed.pformer_model import IGNORE, prompted_logits, shifted_targets

    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            b = make_batch(data, idx[s : s + batch], cfg, pcfg, pad_id, None, device, train=False)
            prompts = model.expand(model.encode(b["enc_ids"], b["enc_mask"]))
            logits = prompted_logits(llm, prompts, b["llm_ids"], b["llm_mask"]).float()
            targets = shifted_targets(b["llm_ids"], b["llm_mask"])
            keep = targets != IGNORE
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits[keep], targets[keep], reduction="sum"))  # fmt: skip
            correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
            total += int(keep.sum())
    model.train()
    return {"val_loss_lm": loss_sum / max(1, total), "val_token_acc": correct / max(1, total)}


def _maybe_fault(cfg: PFormerConfig, run: Path, step: int, rank: int, world: int) -> None:
    """Fault injection (tests): at run.fault_step the last worker SIGKILLs itself, once per run."""
    if cfg.run.fault_step is None or step != cfg.run.fault_step or rank != world - 1:
        return
    marker = run / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(str(step))
    os.kill(os.getpid(), signal.SIGKILL)
