"""vLLM's engine processes die with the process that started them, even when it is SIGKILLed.

vLLM runs its engine core (and, on CPU, its worker) in spawned processes. When the process
that built the ``LLM`` is killed (SIGKILL, the OOM killer, a Ray actor's death), they live on,
holding the model and the KV cache (and a GPU), while the user reruns the command to resume:
vLLM issue #55510 (open; PR #55846 proposes a death pipe for the engine core). Until vLLM
does it itself, ``Reaper`` does: a small watcher process notes, twice a second, the processes
descended from this one; it also holds a pipe from this process, which the kernel closes
when this process dies, however it dies. Then it kills what it noted (each checked by its
start time, so a reused PID is spared).

Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

# The watcher (argv: the watched pid, then pids to leave alone). Until its stdin closes it
# notes the watched process's descendants; then, unless ``close`` said "q" first (a clean
# shutdown), it SIGKILLs the ones still alive.
_WATCHER = r"""
import os, select, signal, sys

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]  # parent pid, start time
    except (OSError, IndexError, ValueError):
        return None

def descendants(root, spare):
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := stat(int(name))):
            parent[int(name)] = s
    found, frontier = {}, {root}
    while frontier:
        frontier = {p for p, (pp, _) in parent.items() if pp in frontier and p not in found}
        found.update({p: parent[p][1] for p in frontier})
    return {p: t for p, t in found.items() if p not in spare}

root, spare = int(sys.argv[1]), {int(p) for p in sys.argv[2:]} | {os.getpid()}
noted = {}
while True:
    noted.update(descendants(root, spare))
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready:
        if sys.stdin.buffer.read(1) == b"q":  # a clean shutdown: nothing to kill
            sys.exit(0)
        break  # EOF without "q": the watched process died
for pid, start in noted.items():
    if (s := stat(pid)) and s[1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return out


class Reaper:
    """From construction to ``close``: processes this one starts are killed if it dies.

    Processes that already existed (e.g. a Ray worker's own helpers) are left alone, and
    ``close`` (a clean shutdown) ends the watcher without killing anything.
    """

    def __init__(self):
        self._watcher: subprocess.Popen | None = None
        if not (sys.platform.startswith("linux") and os.path.isdir("/proc")):
            return
        me = os.getpid()
        spare = [str(p) for p in _children(me)]
        # Its own session: a Ctrl-C in the terminal reaches the command, not the watcher.
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(me), *spare],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def close(self) -> None:
        """Stop watching (call after the engine shut down)."""
        if self._watcher is not None:
            self._watcher.stdin.write(b"q")
            self._watcher.stdin.close()
            self._watcher.wait(timeout=30)
            self._watcher = None
