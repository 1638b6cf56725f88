"""The package faces are cheap and the layout's import rule holds: imports point down only
(cli -> eval -> {train, embed} -> store), embed/ and train/ never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"store": 0, "embed": 1, "train": 1, "eval": 2, "cli": 3}


def _imports(path: Path) -> set[str]:
    """Top-level project packages a module imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found & set(LEVEL)


@pytest.mark.parametrize("package", ["store", "embed", "train", "eval"])
def test_imports_point_down_only(package):
    for path in sorted((ROOT / package).glob("*.py")):
        for target in _imports(path) - {package}:
            assert LEVEL[target] < LEVEL[package], f"{path.relative_to(ROOT)} imports {target}"


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_faces_and_help_import_neither_torch_nor_ray(tmp_path):
    out = _run(
        "import sys\n"
        "import store, embed, train, eval\n"
        "from cli import app\n"
        "for argv in (['--help'], ['synth', '--help'], ['train', '--help']):\n"
        "    try:\n"
        "        app(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'vllm', 'timm', 'duckdb') if m in sys.modules))\n"
    )
    assert out.strip().splitlines()[-1] == "[]"


def test_synth_runs_without_torch(tmp_path):
    out = _run(
        "import sys\n"
        "from cli import app\n"
        f"try:\n    app(['synth', {str(tmp_path / 's')!r}, '--n', '12'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.strip().splitlines()[-1] == "False"
    assert (tmp_path / "s" / "captions.parquet").is_file()


def test_no_face_name_is_also_a_submodule():
    """A name that is also a submodule (``eval.sweep``) would resolve to the module once the
    submodule is imported: faces must not export such names."""
    for package in ("store", "embed", "train", "eval"):
        for name in _face(package).__all__:
            folder = ROOT / package
            clash = (folder / f"{name}.py").exists() or (folder / name).is_dir()
            assert not clash, f"{package}.{name} is both a face name and a submodule"


def test_every_face_name_resolves():
    for package in ("store", "embed", "train", "eval"):
        face = _face(package)
        for name in face.__all__:
            assert getattr(face, name) is not None, f"{package}.{name}"


def _face(package: str):
    import importlib

    return importlib.import_module(package)
