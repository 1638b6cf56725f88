"""Stage one (embed/, store/, the CLI's embed and verify) needs neither stage two's stack (timm,
torchvision) nor Ray when it runs in one process: .venv-vllm has no timm or torchvision, and a
GPU machine running stage one need not have them either. Checked by a real `embed` + `verify`
run in a fresh interpreter where they look uninstalled (their imports fail, and
``importlib.util.find_spec`` finds nothing, so transformers' optional imports skip them as
they do in .venv-vllm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

RUN = r"""
import importlib.abc, importlib.util, json, sys

HIDDEN = {"timm", "torchvision", "ray"}
_find_spec = importlib.util.find_spec

def find_spec(name, package=None):
    return None if name.split(".")[0] in HIDDEN else _find_spec(name, package)

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

importlib.util.find_spec = find_spec
sys.meta_path.insert(0, Hidden())
from cli import app
for argv in (sys.argv[1:-1], ["verify", sys.argv[-1]]):
    try:
        app(argv, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & HIDDEN)))
"""


def test_embed_and_verify_import_no_timm_torchvision_or_ray(synth_data, tiny_model, tmp_path):
    out = tmp_path / "cache"
    argv = ["embed", str(synth_data / "captions.parquet"), "--model", str(tiny_model),
            "--out", str(out), "--recipe", "flame-long", "--engine", "hf", "--limit", "8",
            "--no-progress", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RUN, *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert json.loads((out / "manifest.json").read_text())["shards"]
