"""PNG curves of a run's metrics (loss, learning rate, logit scale), for humans."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_file: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [
        json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()
    ]
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []
    for key, title in (
        ("loss", "training loss"),
        ("lr", "learning rate"),
        ("logit_scale", "logit scale"),
    ):
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
