"""The progress bar every long command shows (embed, train, tune, synth, ...): one look, one
home. rich is imported only when a bar is enabled.

    with Bar("embed", total=n) as bar:
        bar.update(advance=len(batch), info=f"{rate:,.1f} captions/s")
"""

from __future__ import annotations


class Bar:
    """label, bar, done/total, a free text field, elapsed and remaining time; silent when
    ``enabled`` is False (tests, scripts, --no-progress)."""

    def __init__(self, label: str, total: int | None, enabled: bool = True, info: str = ""):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(label, total=total, info=info)
        self.progress.start()

    def update(self, advance: int = 0, completed: int | None = None, info: str | None = None):
        if not self.enabled:
            return
        fields = {} if info is None else {"info": info}
        if completed is not None:
            self.progress.update(self.task, completed=completed, **fields)
        else:
            self.progress.update(self.task, advance=advance, **fields)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
            self.enabled = False

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
