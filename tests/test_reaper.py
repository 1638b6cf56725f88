"""embed.reaper: processes started under a Reaper die when their starter is SIGKILLed (vLLM's
engine processes otherwise outlive a killed `facetclip embed`), and live on after a clean
close."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ROOT = Path(__file__).parents[1]

# The starter: a Reaper, then a child that starts a grandchild (as vLLM's engine core starts
# its worker), both sleeping; it prints READY and waits to be killed, or closes cleanly.
STARTER = r"""
import subprocess, sys, time
from embed.reaper import Reaper
reaper = Reaper()
subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"])
time.sleep(1.5)  # the watcher notes descendants twice a second
print("READY", flush=True)
if sys.argv[1] == "close":
    reaper.close()
    print("CLOSED", flush=True)
time.sleep(120)
"""


def marked(mark: str) -> list[int]:
    """PIDs of live processes whose environment holds ``mark``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark.encode() in f.read():
                    with open(f"/proc/{name}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            out.append(int(name))
        except OSError:
            continue
    return out


def start(mode: str) -> tuple[subprocess.Popen, str]:
    mark = f"FACETCLIP_REAPER_TEST={uuid.uuid4().hex}"
    key, value = mark.split("=")
    env = {**os.environ, key: value, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", STARTER, mode], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "READY"
    return proc, mark


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_descendants_die_with_a_killed_starter():
    proc, mark = start("kill")
    assert len(marked(mark)) == 4  # the starter, its child and grandchild, the watcher
    proc.kill()
    proc.wait()
    assert wait_for(lambda: not marked(mark)), f"left alive: {marked(mark)}"


def test_a_clean_close_kills_nothing():
    proc, mark = start("close")
    try:
        assert proc.stdout.readline().strip() == "CLOSED"
        time.sleep(1.0)
        assert len(marked(mark)) == 3  # the watcher is gone, the others live
    finally:
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
