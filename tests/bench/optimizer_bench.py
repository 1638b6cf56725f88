"""Stage two's optimizer on this CPU: the demo's training step (its tower at 64 px, FLAME's
token-mlp head, mp-sigmoid over 6 facets, channels-last, bf16 autocast where ``run.amp``
uses it here) with AdamW as a per-tensor loop (PyTorch's CPU default) and fused
(``train.model.make_optimizer``, what ``train`` uses), alternated step by step in one process
from identical weights and data, one torch thread (as each of the demo's two Ray workers has).

The loss after the last step is printed for both: the fused kernel computes the same update
to rounding, so the comparison is like with like.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from tests.bench import Report, Target
from tests.bench.precision_bench import demo_step_inputs

FULL = {"batch": 32, "steps": 10, "text_dim": 128}
QUICK = {"batch": 8, "steps": 3, "text_dim": 64}
MODES = ("per-tensor loop", "fused")


def run(quick: bool = False) -> Report:
    from store.precision import use_bf16_autocast
    from train.losses import compute_loss, select_facets
    from train.model import make_optimizer

    p = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, images, vectors = demo_step_inputs(p["batch"], p["text_dim"])
        base = base.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        amp = use_bf16_autocast(True, "cpu")
        models, optimizers = {}, {}
        for mode in MODES:
            m = models[mode] = copy.deepcopy(base)
            if mode == "fused":
                optimizers[mode] = make_optimizer(m, 3e-3, (0.9, 0.95), 0.05, "cpu")
            else:
                optimizers[mode] = torch.optim.AdamW(
                    m.param_groups(0.05), lr=3e-3, betas=(0.9, 0.95), foreach=False
                )

        def step(mode: str, i: int) -> tuple[float, float, float]:
            m, opt = models[mode], optimizers[mode]
            text_in = select_facets(
                vectors, "mp-sigmoid", "sample", 6, torch.Generator().manual_seed(i)
            )
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = compute_loss("mp-sigmoid", **m(images, text_in))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            return t2 - t0, t2 - t1, float(loss.detach())

        for mode in MODES:  # warm-up, the same first step for both
            step(mode, 0)
        steps: dict[str, list[float]] = {mode: [] for mode in MODES}
        opt_s: dict[str, list[float]] = {mode: [] for mode in MODES}
        last: dict[str, float] = {}
        for s in range(1, p["steps"] + 1):
            for mode in MODES if s % 2 else MODES[::-1]:
                total, opt_time, last[mode] = step(mode, s)
                steps[mode].append(total)
                opt_s[mode].append(opt_time)
    finally:
        torch.set_num_threads(threads)

    med = {mode: statistics.median(v) for mode, v in steps.items()}
    med_opt = {mode: statistics.median(v) for mode, v in opt_s.items()}
    ref = med[MODES[0]]
    table = [
        ["", *MODES],
        ["median s/step", *(f"{med[m]:.4f}" for m in MODES)],
        ["of which optimizer.step", *(f"{med_opt[m]:.4f}" for m in MODES)],
        ["speed / per-tensor", *(f"{ref / med[m]:.2f}" for m in MODES)],
        ["loss after the last step", *(f"{last[m]:.5f}" for m in MODES)],
    ]
    n_params = sum(t.numel() for t in base.parameters())
    notes = [
        f"batch {p['batch']}, {n_params / 1e6:.1f}M parameters, 1 torch thread, "
        f"{'bf16 autocast' if amp else 'float32'} (as train runs on this CPU); "
        f"{p['steps']} timed steps each, alternated"
    ]
    targets = [Target("fused step speed / per-tensor", ref / med["fused"], 1.0)]
    return Report("AdamW on CPU: per-tensor loop vs fused", table, targets, notes)
