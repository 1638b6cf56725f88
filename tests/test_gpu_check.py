"""``make gpu-check`` runs only where a GPU is lent; ``--smoke`` runs its every check on the
CPU with toy sizes, so the script cannot rot between GPU sessions."""

import sys

from tests.gpu_check import main


def test_gpu_check_smoke_runs_every_check_without_ray_duckdb_or_vllm(monkeypatch, capsys):
    # the GPU machine has none of these: every import of them must stay lazy
    for name in ("ray", "duckdb", "vllm"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for section in ("(a) hf engine", "(c) throughput", "(d) stage two", "(e) tune step"):
        assert section in out
    assert "FAIL" not in out and out.rstrip().endswith("gpu-check: PASS")
