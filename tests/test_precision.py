"""store.precision: when `run.amp` means bf16 autocast (GPU always; CPU only with bf16 arithmetic)."""

from pathlib import Path

import pytest
import torch

from store import precision
from store.precision import cpu_flags, use_bf16_autocast

# Trimmed /proc/cpuinfo texts of real machines (two logical CPUs each, as the kernel prints them).
EPYC_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl
"""
SAPPHIRE = "flags\t\t: avx512f avx512bw amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    ("text", "native"),
    [(EPYC_BF16, True), (SKYLAKE, False), (SAPPHIRE, True), (GRAVITON3, False), ("", False)],
)
def test_cpu_flags_name_bf16_arithmetic(text, native):
    flags = cpu_flags(text)
    assert bool(flags & precision.CPU_BF16_FLAGS) is native
    if text:
        assert "avx512f" in flags or "asimd" in flags


def test_flags_come_from_flag_lines_only():
    # "model name : ... avx512_bf16" must not count: only the flags/Features lines do
    assert cpu_flags("model name\t: avx512_bf16 edition\nflags\t\t: sse2\n") == {"sse2"}


@pytest.mark.parametrize("native", [True, False])
def test_amp_rule(monkeypatch, native):
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_has_bf16_hardware", lambda: native)
    assert use_bf16_autocast(True, "cuda") is True
    assert use_bf16_autocast(True, torch.device("cuda", 0)) is True
    assert use_bf16_autocast(True, "cuda:1") is True
    assert use_bf16_autocast(True, torch.device("cpu")) is native
    assert use_bf16_autocast(True, "cpu") is native
    for device in ("cuda", "cpu"):  # run.amp = false: float32 everywhere
        assert use_bf16_autocast(False, device) is False
    assert use_bf16_autocast(True, "mps") is False  # not measured: float32


@pytest.mark.parametrize("native", [True, False])
def test_environment_overrides_the_cpu(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_bf16_hardware", lambda: native)
    for value, expect in (("0", False), ("1", True), ("", native), ("maybe", native)):
        monkeypatch.setenv(precision.ENV, value)
        assert use_bf16_autocast(True, "cpu") is expect
    monkeypatch.setenv(precision.ENV, "0")
    assert use_bf16_autocast(True, "cuda") is True  # the override is about CPUs


def test_this_machine_agrees_with_its_cpuinfo(monkeypatch):
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    monkeypatch.delenv(precision.ENV, raising=False)
    assert precision.cpu_computes_bf16() == bool(cpu_flags(text) & precision.CPU_BF16_FLAGS)
