"""Stage two's arithmetic on this CPU: the demo's training step (its tower at 64 px, FLAME's
token-mlp head, mp-sigmoid over 6 facets) in float32, in channels-last, and in channels-last
under bf16 autocast, alternated step by step in one process with identical weights and data.

What ``run.amp`` does on this machine follows ``store.precision``: bf16 only where the CPU
computes it in hardware. The benchmark measures all three either way, so a machine without
bf16 arithmetic shows why it stays in float32; the bf16 target is checked only where the CPU
has bf16 arithmetic (whatever FACETCLIP_CPU_BF16 says).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from tests.bench import Report, Target

FULL = {"batch": 32, "steps": 8, "text_dim": 128}
QUICK = {"batch": 16, "steps": 3, "text_dim": 64}
MODES = ("float32", "channels-last", "channels-last + bf16")


def demo_step_inputs(batch: int, text_dim: int, facets: int = 11):
    """The demo's model (its tower at 64 px, FLAME's token-mlp head; seeded) and one fixed
    batch: images [batch, 3, 64, 64] and L2-normalised vectors [batch, facets, text_dim]."""
    from eval.demo import DEMO_TOWER, DEMO_TOWER_KWARGS
    from train.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(tower=DEMO_TOWER, tower_kwargs=dict(DEMO_TOWER_KWARGS)), text_dim
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 64, 64, generator=gen)
    vectors = torch.nn.functional.normalize(
        torch.randn(batch, facets, text_dim, generator=gen), dim=-1
    )
    return model, images, vectors


def run(quick: bool = False) -> Report:
    from eval.demo import DEMO_TOWER
    from store.precision import ENV, cpu_has_bf16_hardware, use_bf16_autocast
    from train.losses import compute_loss, select_facets

    p = QUICK if quick else FULL
    b = p["batch"]
    base, images, vectors = demo_step_inputs(b, p["text_dim"])
    models, optimizers = {}, {}
    for mode in MODES:
        m = copy.deepcopy(base)
        if mode != "float32":
            m = m.to(memory_format=torch.channels_last)
        models[mode] = m
        # The per-tensor AdamW (the CPU default), as when this table's figures were first
        # taken; the ``optimizer`` benchmark compares it with the fused one ``train`` uses.
        optimizers[mode] = torch.optim.AdamW(m.param_groups(0.05), lr=1e-4)

    def step(mode: str) -> tuple[float, float]:
        m, opt = models[mode], optimizers[mode]
        x = images if mode == "float32" else images.contiguous(memory_format=torch.channels_last)
        text_in = select_facets(
            vectors, "mp-sigmoid", "sample", 6, torch.Generator().manual_seed(1)
        )
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.endswith("bf16")):
            loss = compute_loss("mp-sigmoid", **m(x, text_in))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, float(loss.detach())

    first_loss = {mode: step(mode)[1] for mode in MODES}  # warm-up; the same weights and data
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for s in range(p["steps"]):
        order = MODES if s % 2 == 0 else MODES[::-1]
        for mode in order:
            times[mode].append(step(mode)[0])

    med = {mode: statistics.median(v) for mode, v in times.items()}
    ref = med["float32"]
    table = [
        ["", *MODES],
        ["median s/step", *(f"{med[m]:.3f}" for m in MODES)],
        ["images/s", *(f"{b / med[m]:.0f}" for m in MODES)],
        ["speed / float32", *(f"{ref / med[m]:.2f}" for m in MODES)],
        ["first loss", *(f"{first_loss[m]:.4f}" for m in MODES)],
    ]
    native = cpu_has_bf16_hardware()
    used = "channels-last + bf16" if use_bf16_autocast(True, "cpu") else "channels-last in float32"
    notes = [
        f"batch {b}, {DEMO_TOWER} at 64 px, {torch.get_num_threads()} torch threads; this CPU "
        f"{'computes' if native else 'does not compute'} bf16 in hardware; train runs {used} "
        f"here (run.amp = true; {ENV} overrides)",
    ]
    targets = [Target("channels-last speed / float32", ref / med["channels-last"], 1.0)]
    if native:
        targets.append(Target("channels-last + bf16 speed / float32", ref / med[MODES[2]], 1.2))
    return Report(
        "train step arithmetic on CPU: float32 vs channels-last vs bf16", table, targets, notes
    )
