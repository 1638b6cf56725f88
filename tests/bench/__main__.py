"""``python -m tests.bench [--quick] [--only NAME ...] [--skip NAME ...]``: run the registered
benchmarks and print each one's table and PASS / MISS per target. Exits 0 unless a benchmark
crashes."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tests.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="short run (smaller inputs, fewer repeats)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable); one of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help="leave this benchmark out (repeatable; `make bench` runs vllm in .venv-vllm)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    missed = []
    for name in [n for n in args.only or list(BENCHMARKS) if n not in args.skip]:
        reports = importlib.import_module(BENCHMARKS[name]).run(quick=args.quick)
        for report in reports if isinstance(reports, list) else [reports]:
            print(report.format(), flush=True)
            missed += [f"{name}: {t.name}" for t in report.targets if not t.met]
    print(f"\nbench: {'all targets met' if not missed else 'targets missed: ' + '; '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
