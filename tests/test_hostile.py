"""Hostile inputs against every command, as a user would bring them: each is refused in one
line (exit 2, a single ``error: ...`` line on stderr that says what to do, no traceback) or
handled exactly (the cache holds exactly the expected keys, each once, and the skipped rows
are counted by reason). Read back independently: the cache's shards and ``skipped/`` files
with pyarrow, not through the cache reader.

Three parts:
- ``CASES``: a table of hand-made inputs across every command (ids follow the sweep that found
  them, issue 16: E embed, P plan, C cache tools, Q sql, T train, V eval, S the rest).
- ``test_broken_paths``: every path argument of every command given a missing path, a file
  where a folder belongs (or the reverse), a path under a file and a path under /proc.
- img2dataset fixtures with failed downloads, and a property test over generated caption
  tables (``embed`` refuses in one line or embeds exactly the valid rows, each key once).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app

# --- expectations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """Exit ``code`` with exactly one non-empty stderr line, ``error: ...`` matching ``pattern``."""

    pattern: str
    code: int = 2


@dataclass(frozen=True)
class Usage:
    """Typer's own usage error for a malformed option (click's usage text, exit 2)."""

    pattern: str


@dataclass(frozen=True)
class Embedded:
    """Exit 0; the cache holds exactly ``keys`` (each once) and ``skipped`` by reason."""

    keys: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int | None = None


@dataclass(frozen=True)
class Report:
    """A command that reports a finding (verify): exit ``code``, stdout matching ``pattern``."""

    pattern: str
    code: int = 1


@dataclass(frozen=True)
class Case:
    id: str
    what: str
    build: Callable  # (world, folder) -> argv
    expect: object  # an expectation, or (world) -> expectation
    skip: str | None = None


def invoke(argv: list) -> object:
    return CliRunner().invoke(app, [str(a) for a in argv])


def check(result, expect, out: Path | None = None) -> None:
    text = result.output
    assert "Traceback" not in text, text
    if isinstance(expect, Refused):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == expect.code, text
        assert len(lines) == 1 and lines[0].startswith("error: "), text
        assert re.search(expect.pattern, lines[0]), lines[0]
    elif isinstance(expect, Usage):
        assert result.exit_code == 2 and "Usage:" in text, text
        assert re.search(expect.pattern, " ".join(text.split())), text
    elif isinstance(expect, Report):
        assert result.exit_code == expect.code, text
        assert re.search(expect.pattern, " ".join(result.stdout.split())), result.stdout
    else:
        assert result.exit_code == 0, text
        keys, skipped, truncated = read_cache(out)
        assert sorted(keys) == sorted(expect.keys) and len(set(keys)) == len(keys)
        assert skipped == expect.skipped
        if expect.truncated is not None:
            assert truncated == expect.truncated


def read_cache(out: Path) -> tuple[list[str], dict[str, int], int]:
    """(keys, skip reasons counted, truncated rows) of a cache, read with pyarrow alone."""
    shards = sorted((out / "shards").glob("*.parquet"))
    tables = [pq.read_table(p, columns=["key", "truncated"]) for p in shards]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    truncated = sum(sum(t.column("truncated").to_pylist()) for t in tables)
    reasons = Counter(
        r for p in sorted((out / "skipped").glob("*.parquet"))
        for r in pq.read_table(p, columns=["reason"]).column("reason").to_pylist()
    )  # fmt: skip
    return keys, dict(reasons), truncated


# --- the world the cases run in --------------------------------------------------------------


@dataclass
class World:
    model: Path  # an untrained tiny LM
    caps: Path  # captions.parquet: key, caption, short_caption, long_caption
    keys: list[str]  # its first 6 keys
    texts: list[str]  # and their long captions
    images: Path  # the synthetic set's webdataset images
    retrieval: Path  # its held-out retrieval table folder
    cache: Path  # flame-long over the captions, 20-row shards (read-only)
    run: Path  # an exported (untrained) run: RUN/config.toml, RUN/model/ (read-only)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, synth_data) -> World:
    from embed.pipeline import EmbedConfig, run_embed

    root = tmp_path_factory.mktemp("hostile")
    caps = synth_data / "captions.parquet"
    cache = root / "cache"
    run_embed(EmbedConfig(caps, str(tiny_model), cache, recipe="flame-long", shard_rows=20),
              progress=False)  # fmt: skip
    first = pq.read_table(caps, columns=["key", "long_caption"]).slice(0, 6)
    return World(
        tiny_model, caps, first.column("key").to_pylist(), first.column("long_caption").to_pylist(),
        synth_data / "images", synth_data / "eval" / "retrieval", cache, exported_run(root, cache),
    )  # fmt: skip


def exported_run(root: Path, cache: Path) -> Path:
    """A run folder holding an untrained exported model (no Ray: eval's cases need a model
    to load, not a trained one)."""
    from store.cache import Cache
    from store.runs import latest_checkpoint, save_checkpoint
    from train.config import TrainConfig
    from train.export import export_model
    from train.model import build_model

    run = root / "run"
    layout = Cache.open(cache).manifest.layout
    cfg = TrainConfig(images="x", cache=str(cache), out=str(run), steps=1, batch_size=4)
    cfg.model.tower, cfg.data.image_size = "resnet10t", 32
    cfg.facets = list(layout["vector_names"])
    torch.manual_seed(0)
    model = build_model(cfg.model, layout["dim"])
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "text_dim": layout["dim"],
             "config": cfg.to_dict()}  # fmt: skip
    save_checkpoint(run, model, torch.optim.AdamW(model.parameters()), state)
    export_model(run, latest_checkpoint(run))
    return run


# --- input writers ---------------------------------------------------------------------------


def jsonl(d: Path, records=None, raw: str | None = None, name: str = "c.jsonl") -> Path:
    path = d / name
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records))
    return path


def parquet(d: Path, table: pa.Table, name: str = "c.parquet") -> Path:
    pq.write_table(table, d / name)
    return d / name


def tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


def emb(w: World, d: Path, captions, *extra) -> list:
    return ["embed", captions, "--model", w.model, "--out", d / "out", "--recipe", "flame-long",
            "--shard-rows", "20", "--no-progress", *extra]  # fmt: skip


def damaged_cache(w: World, d: Path, shard: int, columns: str = "one") -> Path:
    """A copy of the cache with all-zero vectors in one shard (``columns``: one facet, or
    all), the manifest's checksum resealed so only the contents betray it."""
    from store.cache import sha256_file

    cache = Path(shutil.copytree(w.cache, d / "cache"))
    path = cache / "shards" / f"part-{shard:05d}.parquet"
    t = pq.read_table(path)
    vectors = [f.name for f in t.schema if pa.types.is_fixed_size_list(f.type)]
    for name in vectors[:1] if columns == "one" else vectors:
        i = t.schema.get_field_index(name)
        f = t.schema.field(i)
        zeros = np.zeros(t.num_rows * f.type.list_size, np.float16)
        t = t.set_column(i, f, pa.FixedSizeListArray.from_arrays(pa.array(zeros), type=f.type))
    pq.write_table(t, path)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][shard].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def kt(w: World, i: int) -> tuple[str, str]:
    return w.keys[i], w.texts[i]


def rows(w: World, key=None, caption=None) -> list[dict]:
    """The six rows, with ``key(i, k)`` / ``caption(i, c)`` swapping in hostile values."""
    return [
        {"key": key(i, k) if key else k, "long_caption": caption(i, c) if caption else c}
        for i, (k, c) in enumerate(zip(w.keys, w.texts, strict=True))
    ]


def all_but(*skip: int) -> Callable[[World], list[str]]:
    return lambda w: [k for i, k in enumerate(w.keys) if i not in skip]


def embedded(keys, skipped=None, truncated=None) -> Callable[[World], Embedded]:
    return lambda w: Embedded(keys(w) if callable(keys) else keys, skipped or {}, truncated)


NOT_KEY = "not a string or an integer"
I2D = ["success", "failed_to_download", "success", "success", "failed_to_download", "success"]

# --- the table -------------------------------------------------------------------------------

CASES = [
    # embed: empty and zero-row inputs: one rule in every format
    Case("E01", "0-byte .parquet", lambda w, d: emb(w, d, _zero(d, "c.parquet")),
         Refused(r"c\.parquet is empty \(0 bytes\)$")),
    Case("E02", "0-byte .jsonl", lambda w, d: emb(w, d, _zero(d, "c.jsonl")),
         Refused(r"c\.jsonl is empty \(0 bytes\)$")),
    Case("E03", "0-byte .csv", lambda w, d: emb(w, d, _zero(d, "c.csv")),
         Refused(r"c\.csv is empty \(0 bytes\)$")),
    Case("E04", "header-only .csv", lambda w, d: emb(w, d, _text(d, "c.csv", "key,long_caption\n")),
         Refused(r"c\.csv has no rows \(a header and no data rows\)$")),
    Case("E05", "zero-row .parquet", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": pa.array([], pa.string()), "long_caption": pa.array([], pa.string())}))),
         Refused(r"c\.parquet has no rows \(0 rows\)$")),
    Case("E06", ".jsonl of blank lines", lambda w, d: emb(w, d, jsonl(d, raw="\n  \n\n")),
         Refused(r"c\.jsonl has no rows \(only blank lines\)$")),
    Case("E07", "0-byte .tsv", lambda w, d: emb(w, d, _zero(d, "c.tsv")),
         Refused(r"c\.tsv is empty \(0 bytes\)$")),
    Case("E08", "a tar without members", lambda w, d: emb(w, d, tar(d / "c.tar", []),
         "--column", "long_caption=txt"), Refused(r"c\.tar has no rows \(no samples\)$")),
    Case("E09", "a folder of 0-byte .jsonl files", lambda w, d: emb(w, d, _empty_folder(d)),
         Refused(r"in has no rows: its 2 jsonl file\(s\) are empty \(0 bytes\)$")),
    # embed: keys that are not strings
    Case("E10", "parquet float key column with NaN", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": [1.0, float("nan"), 3.0, 4.0, 5.0, 6.0], "long_caption": w.texts}))),
         Refused(r"key column 'key' is of type double, not text or integer")),
    Case("E11", "parquet integral floats as keys", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": [float(i) for i in range(6)], "long_caption": w.texts}))),
         Refused(r"key column 'key' is of type double")),
    Case("E12", "parquet int64 keys: str(int)", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": list(range(6)), "long_caption": w.texts}))),
         embedded([str(i) for i in range(6)])),
    Case("E13", "jsonl object keys", lambda w, d: emb(w, d, jsonl(d, rows(w, key=lambda i, k:
         {"a": i}))), Refused(rf"line 1: key 'key' is an object, {NOT_KEY}")),
    Case("E14", "jsonl array keys", lambda w, d: emb(w, d, jsonl(d, rows(w, key=lambda i, k: [i]))),
         Refused(rf"line 1: key 'key' is an array, {NOT_KEY}")),
    Case("E15", "jsonl bare NaN key", lambda w, d: emb(w, d, jsonl(d, raw='{"key": NaN, '
         '"long_caption": "A red star."}\n')), Refused(rf"line 1: key 'key' is a float NaN, {NOT_KEY}")),
    Case("E16", "jsonl boolean keys", lambda w, d: emb(w, d, jsonl(d, rows(w, key=lambda i, k:
         i % 2 == 0))), Refused(rf"line 1: key 'key' is a boolean true, {NOT_KEY}")),
    Case("E17", "jsonl keys 1 and '1': one key", lambda w, d: emb(w, d, jsonl(d, [
         {"key": 1, "long_caption": w.texts[0]}, {"key": "1", "long_caption": w.texts[1]}])),
         Refused(r"1 duplicate key\(s\) .*'1'.*--on-duplicate keep-first")),
    Case("E18", "jsonl float keys", lambda w, d: emb(w, d, jsonl(d, rows(w, key=lambda i, k:
         i + 0.5))), Refused(rf"line 1: key 'key' is a float 0.5, {NOT_KEY}")),
    Case("E19", "jsonl null key on line 3", lambda w, d: emb(w, d, jsonl(d, rows(w, key=lambda i, k:
         None if i == 2 else k))), Refused(r"line 3 has no key \('key' is missing or null\)")),
    Case("E20", "jsonl empty key on line 3", lambda w, d: emb(w, d, jsonl(d, rows(w, key=lambda i, k:
         "" if i == 2 else k))), Refused(r"line 3 has no key \('key' is an empty string\)")),
    Case("E21", "csv empty key cell in row 2", lambda w, d: emb(w, d, _text(d, "c.csv",
         "key,long_caption\na,A red star.\n,A blue cube.\n")),
         Refused(r"c\.csv: row 2 has no key \('key' is missing or null\)")),
    Case("E22", "parquet empty-string key in row 3", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": [k if i != 2 else "" for i, k in enumerate(w.keys)], "long_caption": w.texts}))),
         Refused(r"c\.parquet: row 3 has no key \('key' is an empty string\)")),
    Case("E23", "jsonl key absent from line 2", lambda w, d: emb(w, d, jsonl(d, [
         {"key": "a", "long_caption": "A red star."}, {"long_caption": "A blue cube."}])),
         Refused(r"line 2 has no key \('key' is missing or null\)")),
    # embed: captions that are not text
    Case("E24", "jsonl caption that is an array", lambda w, d: emb(w, d, jsonl(d, rows(w,
         caption=lambda i, c: [c, c] if i == 1 else c))),
         embedded(all_but(1), {"non-text caption in long_caption (array)": 1})),
    Case("E25", "jsonl caption that is an object", lambda w, d: emb(w, d, jsonl(d, rows(w,
         caption=lambda i, c: {"text": c} if i == 1 else c))),
         embedded(all_but(1), {"non-text caption in long_caption (object)": 1})),
    Case("E26", "jsonl captions that are a number and a boolean", lambda w, d: emb(w, d, jsonl(d,
         rows(w, caption=lambda i, c: {1: 42, 3: True}.get(i, c)))), embedded(all_but(1, 3),
         {"non-text caption in long_caption (integer)": 1,
          "non-text caption in long_caption (boolean)": 1})),
    Case("E27", "parquet list<string> caption column", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "long_caption": [[c] for c in w.texts]}))),
         Refused(r"column 'long_caption' is of type list<element: string>, not text")),
    Case("E28", "parquet int64 caption column", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "long_caption": list(range(6))}))),
         Refused(r"column 'long_caption' is of type int64, not text")),
    Case("E29", "parquet struct caption column", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "long_caption": [{"t": c} for c in w.texts]}))),
         Refused(r"column 'long_caption' is of type struct<t: string>, not text")),
    Case("E30", "parquet binary captions, not UTF-8", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "long_caption": pa.array([b"\xff" + c.encode() for c in w.texts])}))),
         Refused(r"binary column 'long_caption' holds bytes that are not UTF-8")),
    Case("E31", "parquet null caption and a blank one", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "long_caption": pa.array([None if i == 1 else " \n\t" if i == 2 else c
                                                   for i, c in enumerate(w.texts)])}))),
         embedded(all_but(1, 2), {"null caption in long_caption": 1,
                                  "empty caption in long_caption": 1})),
    Case("E32", "captions with NUL and control characters", lambda w, d: emb(w, d, parquet(d,
         pa.table({"key": w.keys, "long_caption": [c + "\x00\x07\x1b[31m" for c in w.texts]}))),
         embedded(lambda w: w.keys)),
    Case("E33", "one 200k-character caption", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "long_caption": ["word " * 40000, *w.texts[1:]]}))),
         embedded(lambda w: w.keys, truncated=1)),
    Case("E34", "dictionary-encoded and large_string columns", lambda w, d: emb(w, d, parquet(d,
         pa.table({"key": pa.array(w.keys, pa.large_string()),
                   "long_caption": pa.array(w.texts).dictionary_encode()}))),
         embedded(lambda w: w.keys)),
    Case("E35", "jsonl object naming a field twice", lambda w, d: emb(w, d, jsonl(d, raw=
         '{"key": "a", "long_caption": "x"}\n{"key": "b", "long_caption": "y", "long_caption": "z"}\n')),
         Refused(r"line 2 names field 'long_caption' twice")),
    Case("E36", "parquet naming a column twice", lambda w, d: emb(w, d, parquet(d, pa.Table.from_arrays(
         [pa.array(w.keys), pa.array(w.texts), pa.array(w.texts)],
         names=["key", "long_caption", "long_caption"]))),
         Refused(r"names column 'long_caption' 2 times")),
    # embed: malformed files
    Case("E40", "jsonl with a truncated line 3", lambda w, d: emb(w, d, jsonl(d, raw="".join(
         json.dumps(r)[:20 if i == 2 else None] + "\n" for i, r in enumerate(rows(w))))),
         Refused(r"line 3 is not valid JSON")),
    Case("E41", "jsonl whose line 2 is an array", lambda w, d: emb(w, d, jsonl(d, raw=
         '{"key": "a", "long_caption": "x"}\n[1, 2]\n')),
         Refused(r"line 2 is a JSON array, not an object")),
    Case("E42", "one JSON array in a .json file", lambda w, d: emb(w, d, _text(d, "c.json",
         "[\n" + json.dumps(rows(w)[0]) + "\n]")), Refused(r"jq -c")),
    Case("E43", ".jsonl.gz that is not gzip", lambda w, d: emb(w, d, _text(d, "c.jsonl.gz",
         "not gzip at all")), Refused(r"cannot read .*c\.jsonl\.gz as JSONL")),
    Case("E44", "csv with invalid UTF-8 in row 2", lambda w, d: emb(w, d, _bytes(d, "c.csv",
         b"key,long_caption\na,hello\nb,caf\xe9 au lait\n")),
         Refused(r"row 2 .*column 'long_caption', is not valid UTF-8")),
    Case("E45", "csv with a ragged row", lambda w, d: emb(w, d, _text(d, "c.csv",
         "key,long_caption\na,hello\nb,one,two\n")), Refused(r"Expected 2 columns, got 3")),
    Case("E46", "csv with an unterminated quote", lambda w, d: emb(w, d, _text(d, "c.csv",
         'key,long_caption\na,"hello there\nb,fine\n')),
         Refused(r"quoted value opened on line 2 is never closed")),
    Case("E47", "csv with a BOM, and a stray quote inside a value", lambda w, d: emb(w, d, _bytes(
         d, "c.csv", '\ufeffkey,long_caption\na,A 5" red star.\nb,"A ""quoted"" cube."\n'.encode())),
         embedded(["a", "b"])),
    Case("E48", "csv naming a column twice", lambda w, d: emb(w, d, _text(d, "c.csv",
         "key,long_caption,long_caption\na,one,two\n")),
         Refused(r"names column 'long_caption' 2 times")),
    Case("E49", ".parquet holding CSV text", lambda w, d: emb(w, d, _text(d, "c.parquet",
         "key,long_caption\na,b\n")), Refused(r"cannot read .*c\.parquet as Parquet")),
    Case("E50", "a truncated .parquet", lambda w, d: emb(w, d, _bytes(d, "c.parquet",
         w.caps.read_bytes()[: w.caps.stat().st_size // 2])),
         Refused(r"cannot read .*c\.parquet as Parquet")),
    Case("E51", "a webdataset tar cut mid-member", lambda w, d: emb(w, d, _bytes(d, "w/00000.tar",
         _first_tar(w)[: len(_first_tar(w)) // 2 + 100]), "--column", "long_caption=txt"),
         Refused(r"00000\.tar is truncated: it ends without the tar end-of-archive blocks")),
    Case("E57", "a webdataset tar cut inside an image it seeks over", lambda w, d: emb(w, d, _bytes(
         d, "w/00000.tar", _first_tar(w)[: _inside_first_image(w)]), "--column",
         "long_caption=txt"), Refused(r"00000\.tar is truncated: member .*\.jpg runs past the end")),
    Case("E52", "a folder mixing csv and jsonl", lambda w, d: emb(w, d, _mixed(d)),
         Refused(r"mixes caption formats \(csv, jsonl\)")),
    Case("E53", "an empty folder", lambda w, d: emb(w, d, _mkdir(d / "in")),
         Refused(r"no caption files in directory")),
    Case("E54", "an unknown extension", lambda w, d: emb(w, d, _text(d, "c.txt", "x\n")),
         Refused(r"cannot tell the format of .*c\.txt")),
    Case("E55", "a caption path that does not exist", lambda w, d: emb(w, d, d / "nope.parquet"),
         Refused(r"nope\.parquet does not exist")),
    Case("E56", "jsonl whose caption field appears after record 1000", lambda w, d: emb(w, d, jsonl(
         d, [{"key": f"k{i}", "other": "x"} for i in range(1000)] + [{"key": "z",
         "long_caption": "A red star."}])), Refused(r"not found in the first 1000 records of .*"
         r"a field that first appears later is not seen")),
    # embed: img2dataset failed downloads (more in test_img2dataset_*)
    Case("E60", "img2dataset parquet: 2 failed downloads", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": w.keys, "caption": w.texts, "status": I2D, "jpg": pa.array([b"\xff\xd8" if s ==
          "success" else None for s in I2D], pa.binary())}), "00000.parquet"),
         "--column", "long_caption=caption"),
         embedded(all_but(1, 4), {"failed download (failed_to_download)": 2})),
    Case("E61", "parquet with image bytes, no status, a null image", lambda w, d: emb(w, d, parquet(
         d, pa.table({"key": w.keys, "long_caption": w.texts, "jpg": pa.array(
         [None if i == 5 else b"\xff\xd8" for i in range(6)], pa.binary())}))),
         embedded(all_but(5), {"failed download (no image)": 1})),
    # embed: options, models and paths
    Case("E70", "a model folder without tokenizer files", lambda w, d: emb(w, d, w.caps, "--model",
         _no_tokenizer(w, d)), Refused(r"cannot load the tokenizer of .*none of the tokenizer files")),
    Case("E71", "a model folder with a corrupt config.json", lambda w, d: emb(w, d, w.caps, "--model",
         _corrupt_config(w, d)), Refused(r"cannot read the model config")),
    Case("E72", "--model that does not exist", lambda w, d: emb(w, d, w.caps, "--model", d / "nomodel"),
         Refused(r"is not a directory with a Hugging Face model")),
    Case("E73", "--out is a file", lambda w, d: ["embed", w.caps, "--model", w.model, "--out",
         _text(d, "f", "x"), "--recipe", "flame-long", "--limit", "4", "--no-progress"],
         Refused(r"cannot create the cache folder")),
    Case("E74", "--out under /proc", lambda w, d: ["embed", w.caps, "--model", w.model, "--out",
         "/proc/facetclip-no/cache", "--recipe", "flame-long", "--limit", "4", "--no-progress"],
         Refused(r"cannot create the cache folder /proc")),
    Case("E75", "--out a folder that is not a cache", lambda w, d: emb(w, d, w.caps, "--limit", "4",
         "--out", _text(_mkdir(d / "mine"), "notes.txt", "x").parent),
         Refused(r"exists, is not empty and is not a facetclip cache")),
    Case("E76", "--recipe unknown", lambda w, d: ["embed", w.caps, "--model", w.model, "--out",
         d / "o", "--recipe", "nosuch"], Refused(r"unknown recipe 'nosuch'")),
    Case("E77", "--recipe file that is not TOML", lambda w, d: ["embed", w.caps, "--model", w.model,
         "--out", d / "o", "--recipe", _text(d, "r.toml", "name = [unclosed\n")],
         Refused(r"cannot read recipe file")),
    Case("E78", "--dtype bfloat16", lambda w, d: emb(w, d, w.caps, "--dtype", "bfloat16"),
         Refused(r"dtype must be one of")),
    Case("E79", "--layer 99 on a 4-layer model", lambda w, d: emb(w, d, w.caps, "--layer", "99"),
         Refused(r"layer 99 is out of range")),
    Case("E80", "--shard-rows 0", lambda w, d: emb(w, d, w.caps, "--shard-rows", "0"),
         Usage(r"Invalid value for '--shard-rows'")),
    Case("E81", "--column without '='", lambda w, d: emb(w, d, w.caps, "--column", "long_caption"),
         Refused(r"--column expects RECIPE_COLUMN=INPUT_COLUMN")),
    Case("E82", "--column naming a missing column", lambda w, d: emb(w, d, w.caps, "--column",
         "long_caption=nosuch"), Refused(r"column 'nosuch' not found .*--column RECIPE_COLUMN")),
    Case("E83", "--key-column that does not exist", lambda w, d: emb(w, d, w.caps, "--key-column",
         "id"), Refused(r"column 'id' not found")),
    Case("E84", "resume a cache made with another --layer", lambda w, d: ["embed", w.caps, "--model",
         w.model, "--out", shutil.copytree(w.cache, d / "out"), "--recipe", "flame-long",
         "--layer", "1", "--no-progress"],
         Refused(r"another recipe; refusing to mix vectors\. Differences: layer: ")),
    Case("E85", "duplicate keys", lambda w, d: emb(w, d, parquet(d, pa.table(
         {"key": [w.keys[0], *w.keys[:5]], "long_caption": w.texts}))),
         Refused(r"1 duplicate key\(s\)")),
    Case("E86", "--engine vllm without vLLM", lambda w, d: emb(w, d, w.caps, "--engine", "vllm"),
         Refused(r"--engine vllm needs vLLM"), skip="vllm"),
    Case("E87", "--device cuda without a GPU", lambda w, d: emb(w, d, w.caps, "--device", "cuda",
         "--engine", "hf"), Refused(r"no CUDA GPU is visible"), skip="cuda"),
    Case("E88", "--device tpu", lambda w, d: emb(w, d, w.caps, "--device", "tpu", "--engine", "hf"),
         Refused(r"--device")),
    Case("E89", "--input-format xml", lambda w, d: emb(w, d, w.caps, "--input-format", "xml"),
         Refused(r"unknown caption format 'xml'")),
    # plan
    Case("P01", "plan on a 0-byte .jsonl", lambda w, d: ["plan", _zero(d, "c.jsonl"), "--model",
         w.model, "--recipe", "flame-long"], Refused(r"c\.jsonl is empty \(0 bytes\)$")),
    Case("P02", "plan with a missing model", lambda w, d: ["plan", w.caps, "--model", d / "nomodel"],
         Refused(r"nomodel")),
    Case("P03", "plan --gpu tpu", lambda w, d: ["plan", w.caps, "--model", w.model, "--gpu", "tpu"],
         Refused(r"unknown --gpu 'tpu'")),
    Case("P04", "plan --mfu 0", lambda w, d: ["plan", w.caps, "--model", w.model, "--mfu", "0"],
         Refused(r"--mfu")),
    Case("P05", "plan on array captions", lambda w, d: ["plan", jsonl(d, rows(w, caption=lambda i, c:
         [c])), "--model", w.model, "--recipe", "flame-long", "--json"], Report(r'"embedded": 0', 0)),
    # cache tools
    Case("C01", "inspect a folder that is not a cache", lambda w, d: ["inspect", d],
         Refused(r"is not a facetclip cache: missing recipe\.toml, manifest\.json")),
    Case("C02", "inspect a file", lambda w, d: ["inspect", _text(d, "f", "x")],
         Refused(r"is not a directory")),
    Case("C03", "inspect with a truncated manifest", lambda w, d: ["inspect", _truncated_manifest(w, d)],
         Refused(r"manifest\.json is unreadable")),
    Case("C04", "inspect with a shard deleted", lambda w, d: ["inspect", _no_shard(w, d)],
         Refused(r"part-00001\.parquet")),
    Case("C05", "neighbors of a key not in the cache", lambda w, d: ["neighbors", w.cache, "nosuch"],
         Refused(r"no caption with key 'nosuch'")),
    Case("C06", "neighbors --facet unknown", lambda w, d: ["neighbors", w.cache, w.keys[0], "--facet",
         "nosuch"], Refused(r"no facet 'nosuch'")),
    Case("C07", "neighbors of a zeroed vector", lambda w, d: ["neighbors", damaged_cache(w, d, 0),
         w.keys[0]], Refused(r"is all zeros or not finite.*facetclip verify")),
    Case("C08", "export into a non-empty folder", lambda w, d: ["export", w.cache, _text(_mkdir(
         d / "o"), "x", "x").parent], Refused(r"exists and is not empty")),
    Case("C09", "export OUT is a file", lambda w, d: ["export", w.cache, _text(d, "o", "x")],
         Refused(r"o: File exists; it exists already|not a directory|is a file")),
    Case("C10", "export --facet unknown", lambda w, d: ["export", w.cache, d / "o", "--facet", "nosuch"],
         Refused(r"no vector\(s\) \['nosuch'\]")),
    Case("C11", "export OUT under /proc", lambda w, d: ["export", w.cache, "/proc/facetclip-no/o"],
         Refused(r"/proc/facetclip-no")),
    Case("C12", "verify an empty folder", lambda w, d: ["verify", d],
         Refused(r"is not a facetclip cache")),
    Case("C13", "verify a manifest that is a list", lambda w, d: ["verify", _manifest(w, d, "[]")],
         Refused(r"manifest\.json is unreadable")),
    Case("C14", "verify a resealed all-zero column", lambda w, d: ["verify", damaged_cache(w, d, 1)],
         Report(r"zero")),
    Case("C15", "verify --repair with a manifest that is a folder", lambda w, d: ["verify",
         "--repair", _manifest_folder(w, d)], Refused(r"manifest\.json")),
    Case("C16", "export --format xml", lambda w, d: ["export", w.cache, d / "o", "--format", "xml"],
         Refused(r"--format must be one of npy")),
    # sql
    Case("Q01", "sql on a folder that is not a cache", lambda w, d: ["sql", d, "SELECT 1"],
         Refused(r"is not a facetclip cache")),
    Case("Q02", "sql with a syntax error", lambda w, d: ["sql", w.cache, "SELEC key FROM embeddings"],
         Refused(r"Parser Error: syntax error at or near \"SELEC\"$")),
    Case("Q03", "sql COPY to a file", lambda w, d: ["sql", w.cache, f"COPY embeddings TO '{d}/x.csv'"],
         Refused(r"read-only and confined")),
    Case("Q04", "sql reading /etc/passwd", lambda w, d: ["sql", w.cache,
         "SELECT * FROM read_csv('/etc/passwd')"], Refused(r"read-only and confined")),
    Case("Q05", "sql --output in a missing folder", lambda w, d: ["sql", w.cache, "SELECT key FROM "
         "embeddings", "--format", "csv", "--output", d / "no" / "x.csv"], Refused(r"does not exist")),
    Case("Q06", "sql --output an existing pipe", lambda w, d: ["sql", w.cache, "SELECT key FROM "
         "embeddings", "--format", "csv", "--output", _fifo(d)],
         Refused(r"exists and is not a regular file")),
    Case("Q07", "sql with an empty query", lambda w, d: ["sql", w.cache, ""],
         Refused(r"the query is empty")),
    Case("Q08", "sql on a cache missing a shard", lambda w, d: ["sql", _no_shard(w, d),
         "SELECT count(*) FROM embeddings"], Refused(r"part-00001\.parquet")),
    Case("Q09", "sql two statements", lambda w, d: ["sql", w.cache, "SELECT 1; SELECT 2"],
         Refused(r"one statement at a time")),
    # train (every case fails before Ray starts)
    Case("T01", "--cache that is not a cache", lambda w, d: _train(w, d, cache=d),
         Refused(r"is not a facetclip cache")),
    Case("T02", "--images that does not exist", lambda w, d: _train(w, d, images=d / "nope"),
         Refused(r"image input .*nope does not exist")),
    Case("T03", "--out is a file", lambda w, d: _train(w, d, out=_text(d, "run", "x")),
         Refused(r"--out .*run is a file, not a folder")),
    Case("T04", "--config not TOML", lambda w, d: ["train", "--config", _text(d, "t.toml", "[[["),
         "--out", d / "run"], Refused(r"cannot read config")),
    Case("T05", "--set unknown.field", lambda w, d: _train(w, d, "--set", "nosuch.field=1"),
         Refused(r"'nosuch' is not a config section")),
    Case("T06", "--set optim.lr=abc", lambda w, d: _train(w, d, "--set", "optim.lr=abc"),
         Refused(r"optim\.lr must be a number, got 'abc'")),
    Case("T07", "--set run.workers=2.5", lambda w, d: _train(w, d, "--set", "run.workers=2.5"),
         Refused(r"run\.workers must be an integer, got 2\.5")),
    Case("T08", "--tower timm does not know", lambda w, d: _train(w, d, "--tower", "resnet_nosuch"),
         Refused(r"unknown timm model 'resnet_nosuch'")),
    Case("T09", "an images table sharing no key with the cache", lambda w, d: _train(w, d,
         images=_text(d, "t.csv", "key,image\nzz1,a.jpg\nzz2,b.jpg\n")),
         Refused(r"share no keys, so there is nothing to train on \(images: 2 keys")),
    Case("T10", "an images table naming files that do not exist", lambda w, d: _train(w, d,
         images=_text(d, "t.csv", "key,image\n" + "".join(f"{k},gone/{k}.jpg\n" for k in w.keys))),
         Refused(r"none of the first 6 image files that .*t\.csv names exists")),
    Case("T11", "--resume a folder that is not a run", lambda w, d: ["train", "--resume", d],
         Refused(r"is not a run directory")),
    Case("T12", "missing --images and --cache", lambda w, d: ["train", "--out", d / "run"],
         Refused(r"missing --images \(or --image-cache\), --cache")),
    Case("T13", "an images table whose key column holds floats", lambda w, d: _train(w, d,
         images=parquet(d, pa.table({"key": [1.5, 2.5], "image": ["a.jpg", "b.jpg"]}), "t.parquet")),
         Refused(r"key column 'key' is of type double")),
    # eval
    Case("V01", "eval on a folder that is not a run", lambda w, d: ["eval", d, "--task", "retrieval",
         "--data", w.retrieval], Refused(r"is not an exported model")),
    Case("V02", "eval --task bogus", lambda w, d: ["eval", w.run, "--task", "bogus", "--data",
         w.retrieval], Refused(r"--task must be one of")),
    Case("V03", "eval --data that does not exist", lambda w, d: ["eval", w.run, "--task", "retrieval",
         "--data", d / "nope"], Refused(r"nope does not exist")),
    Case("V04", "eval table without the caption column", lambda w, d: ["eval", w.run, "--task",
         "retrieval", "--data", w.retrieval, "--caption-column", "nosuch"], Refused(r"nosuch")),
    Case("V05", "eval table with an array caption", lambda w, d: ["eval", w.run, "--task", "retrieval",
         "--data", _eval_table(w, d)], Refused(r"row 2 has no text in 'long_caption'")),
    Case("V06", "eval --data an empty folder", lambda w, d: ["eval", w.run, "--task", "zeroshot",
         "--data", _mkdir(d / "e")], Refused(r"no class folders")),
    Case("V07", "eval --layout karpathy without its json", lambda w, d: ["eval", w.run, "--task",
         "retrieval", "--layout", "karpathy", "--data", _mkdir(d / "k")],
         Refused(r"expected exactly one dataset_\*\.json")),
    Case("V08", "eval --task captioning with --image-cache", lambda w, d: ["eval", w.run, "--task",
         "captioning", "--data", w.retrieval, "--image-cache", d], Refused(r"--task captioning "
                                                                          r"runs the tower")),
    # synth, tiny-llm, smollm2, sweep, demo
    Case("S01", "synth OUT is a file", lambda w, d: ["synth", _text(d, "o", "x"), "--n", "8"],
         Refused(r"exists and is not a directory")),
    Case("S02", "tiny-llm OUT under /proc", lambda w, d: ["tiny-llm", "/proc/facetclip-no/m",
         "--steps", "0", "--hidden-size", "16", "--layers", "1"], Refused(r"/proc/facetclip-no")),
    Case("S03", "sweep config that is not TOML", lambda w, d: ["sweep", "--config", _text(d, "s.toml",
         "[[["), "--out", d / "s"], Refused(r"cannot read sweep config")),
    Case("S04", "sweep config with an unknown field", lambda w, d: ["sweep", "--config", _text(d,
         "s.toml", '[search]\n"nosuch.field" = [1, 2]\n'), "--out", d / "s", "--images",
         w.images, "--cache", w.cache], Refused(r"'nosuch' is not a config section")),
    Case("S05", "demo --out is a file", lambda w, d: ["demo", "--out", _text(d, "o", "x"), "--n",
         "200"], Refused(r"o: Not a directory; a part of the path is a file")),
    Case("S06", "smollm2 OUT is a file", lambda w, d: ["smollm2", _text(d, "o", "x")],
         Refused(r"smollm2: .*o exists and is not a directory; choose another OUT")),
    Case("S07", "tiny-llm OUT is a file", lambda w, d: ["tiny-llm", _text(d, "o", "x"), "--steps",
         "0"], Refused(r"tiny-llm: .*o exists and is not a directory; choose another OUT")),
    # pformer: its own trainer over captions (not images), the same readers and config rules
    Case("F01", "pformer without CAPTIONS", lambda w, d: ["pformer", "--model", w.model, "--out",
         d / "pf"], Refused(r"missing CAPTIONS \(or pass --resume RUN\)")),
    Case("F02", "pformer --resume of a folder that is no run", lambda w, d: ["pformer", "--resume",
         d], Refused(r"is not a pformer run")),
    Case("F03", "pformer with a model folder without tokenizer files", lambda w, d: _pf(w, d,
         "--model", _no_tokenizer(w, d)), Refused(r"cannot load the tokenizer of .*none of the")),
    Case("F04", "pformer --set optim.lr=abc", lambda w, d: _pf(w, d, "--set", "optim.lr=abc"),
         Refused(r"optim\.lr must be a number, got 'abc' \(str\)")),
    Case("F05", "pformer --set nosuch.field=1", lambda w, d: _pf(w, d, "--set", "nosuch.field=1"),
         Refused(r"'nosuch' is not a config section")),
    Case("F06", "pformer on a 0-byte captions file", lambda w, d: _pf(w, d, captions=_zero(d,
         "c.jsonl")), Refused(r"c\.jsonl is empty \(0 bytes\)")),
    Case("F07", "pformer --out is a file", lambda w, d: _pf(w, d, out=_text(d, "o", "x")),
         Refused(r"o: Not a directory")),
    # caption: only a run trained for prompts (its image-side failures, a corrupt image and an
    # empty folder, are in test_captioning.py, which trains one)
    Case("K01", "caption with a run trained with another loss", lambda w, d: ["caption", w.run,
         w.images], Refused(r"was trained with --loss mp-sigmoid; only runs trained with "
                            r"--loss prompt-align or caption-lm")),
    Case("K02", "caption with a folder that is not a run", lambda w, d: ["caption", d, w.images],
         Refused(r"is not an exported model \(no config\.json\)")),
    Case("K03", "caption --beams 0", lambda w, d: ["caption", w.run, w.images, "--beams", "0"],
         Usage(r"--beams")),
    # tune: LLM2CLIP's caption-contrastive LoRA (its other bad inputs: tests/test_tune.py)
    Case("U01", "tune --lora-r 0", lambda w, d: _tune(w, d, "--lora-r", "0"),
         Refused(r"lora\.r must be >= 1 \(LLM2CLIP: 16\), got 0")),
    Case("U02", "tune --model a folder without config.json", lambda w, d: _tune(w, d, "--model",
         _mkdir(d / "m")), Refused(r"has no config\.json; it must be a Hugging Face model")),
    Case("U03", "tune with a batch larger than the pairs", lambda w, d: _tune(w, d, "--batch-size",
         "100000"), Refused(r"caption pairs in .*need \d+; lower --eval-pairs or --batch-size")),
    # embed-images: a frozen tower's features (nothing is downloaded)
    Case("I01", "embed-images without weights, a run or --random-init", lambda w, d: ["embed-images",
         w.images, "--out", d / "ic", "--tower", "resnet10t"], Refused(r"give exactly one of "
                                                                     r"--weights PATH")),
    Case("I02", "embed-images with a tower timm does not know", lambda w, d: ["embed-images",
         w.images, "--out", d / "ic", "--tower", "resnet_nosuch", "--random-init"],
         Refused(r"unknown timm model 'resnet_nosuch'")),
    Case("I03", "embed-images on an empty folder", lambda w, d: ["embed-images", _mkdir(d / "e"),
         "--out", d / "ic", "--tower", "resnet10t", "--random-init"], Refused(r"no images found in")),
    Case("I04", "embed-images --from-run a folder that is not a run", lambda w, d: ["embed-images",
         w.images, "--out", d / "ic", "--from-run", d], Refused(r"is not an exported model")),
]  # fmt: skip


def _tune(w: World, d: Path, *extra) -> list:
    return ["tune", w.caps, "--model", w.model, "--out", d / "tuned", "--steps", "1",
            "--no-progress", *extra]  # fmt: skip


def _pf(w: World, d: Path, *extra, captions=None, out=None) -> list:
    return ["pformer", captions or w.caps, "--model", w.model, "--out", out or d / "pf",
            "--steps", "1", "--batch-size", "4", "--no-progress", *extra]  # fmt: skip


# --- small builders the table uses ---------------------------------------------------------


def _zero(d: Path, name: str) -> Path:
    (d / name).write_bytes(b"")
    return d / name


def _text(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d / name


def _bytes(d: Path, name: str, data: bytes) -> Path:
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return d / name


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe")
    return d / "pipe"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _empty_folder(d: Path) -> Path:
    for name in ("a.jsonl", "b.jsonl"):
        _zero(_mkdir(d / "in"), name)
    return d / "in"


def _mixed(d: Path) -> Path:
    _text(_mkdir(d / "in"), "a.csv", "key,long_caption\na,b\n")
    _text(d / "in", "b.jsonl", '{"key": "c", "long_caption": "d"}\n')
    return d / "in"


def _first_tar(w: World) -> bytes:
    return sorted(w.images.glob("*.tar"))[0].read_bytes()


def _inside_first_image(w: World) -> int:
    with tarfile.open(sorted(w.images.glob("*.tar"))[0]) as t:
        image = next(m for m in t.getmembers() if m.name.endswith(".jpg"))
    return image.offset_data + image.size // 2


def _no_tokenizer(w: World, d: Path) -> Path:
    model = Path(shutil.copytree(w.model, d / "m"))
    for p in [*model.glob("*token*"), *model.glob("*.model"), *model.glob("vocab*")]:
        p.unlink()
    return model


def _corrupt_config(w: World, d: Path) -> Path:
    model = Path(shutil.copytree(w.model, d / "m"))
    (model / "config.json").write_text("{not json")
    return model


def _truncated_manifest(w: World, d: Path) -> Path:
    cache = Path(shutil.copytree(w.cache, d / "cache"))
    text = (cache / "manifest.json").read_text()
    (cache / "manifest.json").write_text(text[: len(text) // 2])
    return cache


def _manifest(w: World, d: Path, text: str) -> Path:
    cache = Path(shutil.copytree(w.cache, d / "cache"))
    (cache / "manifest.json").write_text(text)
    return cache


def _manifest_folder(w: World, d: Path) -> Path:
    cache = Path(shutil.copytree(w.cache, d / "cache"))
    (cache / "manifest.json").unlink()
    (cache / "manifest.json").mkdir()
    return cache


def _no_shard(w: World, d: Path) -> Path:
    cache = Path(shutil.copytree(w.cache, d / "cache"))
    (cache / "shards" / "part-00001.parquet").unlink()
    return cache


def _train(w: World, d: Path, *extra, images=None, cache=None, out=None) -> list:
    return ["train", "--images", images or w.images, "--cache", cache or w.cache, "--out",
            out or d / "run", "--steps", "1", "--batch-size", "4", "--workers", "1", "--tower",
            "resnet10t", "--no-progress", *extra]  # fmt: skip


def _eval_table(w: World, d: Path) -> Path:
    table = _mkdir(d / "r")
    shutil.copytree(w.retrieval / "images", table / "images")
    t = pq.read_table(w.retrieval / "captions.parquet")
    records = [{"image": r["image"], "long_caption": r["long_caption"]} for r in t.to_pylist()]
    records[1]["long_caption"] = ["not", "text"]
    jsonl(table, records, name="captions.jsonl")
    return table


def _skip(case: Case) -> str | None:
    if case.skip == "cuda" and torch.cuda.is_available():
        return "this machine has a GPU"
    if case.skip == "vllm":
        from embed.engine import vllm_available

        return "vLLM is installed here" if vllm_available() else None
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, world, tmp_path):
    reason = _skip(case)
    if reason:
        pytest.skip(reason)
    argv = case.build(world, tmp_path)
    expect = case.expect(world) if callable(case.expect) else case.expect
    check(invoke(argv), expect, tmp_path / "out")


def test_the_cases_cover_every_command():
    """Every command of the CLI is run by the table (by the command word of its argv) and by
    the broken-path sweep."""
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert set(BROKEN) == names
    assert set(re.findall(r'\[\s*"([a-z0-9-]+)"', Path(__file__).read_text())) >= names


# --- every path argument of every command, broken -----------------------------------------------

# command -> (argv builder: (world, {slot: path}) -> argv, {slot: (kind, role)}); kind: "dir" or
# "file"; role: "in" (must exist) or "out" (created).
BROKEN: dict[str, tuple[Callable, dict[str, tuple[str, str]]]] = {
    "synth": (lambda w, p: ["synth", p["OUT"], "--n", "8"], {"OUT": ("dir", "out")}),
    "tiny-llm": (lambda w, p: ["tiny-llm", p["OUT"], "--steps", "0", "--hidden-size", "16",
                               "--layers", "1"], {"OUT": ("dir", "out")}),
    "smollm2": (lambda w, p: ["smollm2", p["OUT"]], {"OUT": ("dir", "out")}),
    "embed": (lambda w, p: ["embed", p["CAPTIONS"], "--model", p["--model"], "--out", p["--out"],
                            "--recipe", "flame-long", "--limit", "2", "--no-progress"],
              {"CAPTIONS": ("file", "in"), "--model": ("dir", "in"), "--out": ("dir", "out")}),
    "plan": (lambda w, p: ["plan", p["CAPTIONS"], "--model", p["--model"], "--recipe", "flame-long"],
             {"CAPTIONS": ("file", "in"), "--model": ("dir", "in")}),
    "inspect": (lambda w, p: ["inspect", p["CACHE"]], {"CACHE": ("dir", "in")}),
    "sql": (lambda w, p: ["sql", p["CACHE"], "SELECT key FROM embeddings", "--format", "csv",
                          "--output", p["--output"]],
            {"CACHE": ("dir", "in"), "--output": ("file", "out")}),
    "verify": (lambda w, p: ["verify", p["CACHE"]], {"CACHE": ("dir", "in")}),
    "neighbors": (lambda w, p: ["neighbors", p["CACHE"], w.keys[0]], {"CACHE": ("dir", "in")}),
    "export": (lambda w, p: ["export", p["CACHE"], p["OUT"]],
               {"CACHE": ("dir", "in"), "OUT": ("dir", "out")}),
    "train": (lambda w, p: ["train", "--images", p["--images"], "--cache", p["--cache"], "--out",
                            p["--out"], "--config", p["--config"], "--steps", "1", "--tower",
                            "resnet_nosuch", "--no-progress"],
              {"--images": ("dir", "in"), "--cache": ("dir", "in"), "--out": ("dir", "out"),
               "--config": ("file", "in")}),
    "sweep": (lambda w, p: ["sweep", "--config", p["--config"], "--out", p["--out"], "--images",
                            p["--images"], "--cache", p["--cache"], "--no-progress"],
              {"--config": ("file", "in"), "--out": ("dir", "out"), "--images": ("dir", "in"),
               "--cache": ("dir", "in")}),
    "eval": (lambda w, p: ["eval", p["RUN"], "--task", "retrieval", "--data", p["--data"],
                           "--name", "nosuch-layout-check"],
             {"RUN": ("dir", "in"), "--data": ("dir", "in")}),
    "demo": (lambda w, p: ["demo", "--out", p["--out"], "--n", "200"], {"--out": ("dir", "out")}),
    "tune": (lambda w, p: ["tune", p["CAPTIONS"], "--model", p["--model"], "--out", p["--out"],
                           "--steps", "1", "--batch-size", "100000", "--no-progress"],
             {"CAPTIONS": ("file", "in"), "--model": ("dir", "in"), "--out": ("dir", "out")}),
    "embed-images": (lambda w, p: ["embed-images", p["IMAGES"], "--out", p["--out"], "--tower",
                                   "resnet_nosuch", "--random-init"],
                     {"IMAGES": ("dir", "in"), "--out": ("dir", "out")}),
    "caption": (lambda w, p: ["caption", p["RUN"], p["IMAGES"], "--out", p["--output"]],
                {"RUN": ("dir", "in"), "IMAGES": ("dir", "in"), "--output": ("file", "out")}),
    "pformer": (lambda w, p: ["pformer", p["CAPTIONS"], "--model", p["--model"], "--out",
                              p["--out"], "--steps", "1", "--batch-size", "100000", "--no-progress"],
                {"CAPTIONS": ("file", "in"), "--model": ("dir", "in"), "--out": ("dir", "out")}),
}  # fmt: skip
# (train's and embed-images' --tower resnet_nosuch, pformer's and tune's batch larger than their
# captions and sweep's config
# with an unknown field make sure that a broken path which happens to be accepted still ends in
# a one-line refusal, not a real run.)

BROKEN_KINDS = ("missing", "wrong-kind", "under-a-file", "under-proc")


def _good_paths(w: World, d: Path) -> dict[str, Path]:
    sweep = _text(d, "sweep.toml", '[search]\n"nosuch.field" = [1, 2]\n')
    config = _text(d, "train.toml", "steps = 1\nbatch_size = 4\n")
    return {"CAPTIONS": w.caps, "--model": w.model, "CACHE": w.cache, "--cache": w.cache,
            "--images": w.images, "IMAGES": w.images, "RUN": w.run, "--data": w.retrieval,
            "--config": config, "OUT": d / "new-out", "--out": d / "new-out", "--output": d / "result.csv",
            "_sweep": sweep}  # fmt: skip


def _broken(kind: str, shape: str, d: Path) -> Path:
    a_file = _text(d, "a-file", "x")
    if kind == "missing":
        return d / "does-not-exist"
    if kind == "wrong-kind":
        return a_file if shape == "dir" else _mkdir(d / "a-folder")
    if kind == "under-a-file":
        return a_file / "below"
    return Path("/proc/facetclip-no/below")


BROKEN_PARAMS = [
    (cmd, slot, kind)
    for cmd, (_, slots) in BROKEN.items()
    for slot, (shape, role) in slots.items()
    for kind in BROKEN_KINDS
    if not (role == "out" and kind == "missing")  # a missing OUT is simply created
]


@pytest.mark.parametrize("cmd,slot,kind", BROKEN_PARAMS, ids=["-".join(p) for p in BROKEN_PARAMS])
def test_broken_paths(cmd, slot, kind, world, tmp_path):
    build, slots = BROKEN[cmd]
    paths = _good_paths(world, tmp_path)
    if cmd == "sweep":
        paths["--config"] = paths["_sweep"]
    paths[slot] = _broken(kind, slots[slot][0], tmp_path)
    r = invoke(build(world, paths))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.output and r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(monkeypatch, world):
    """Anything that is not an expected failure is a bug: the traceback, then a line saying so."""
    import store.inspect

    def broken(*args, **kwargs):
        raise ZeroDivisionError("an internal mistake")

    monkeypatch.setattr(store.inspect, "inspect_cache", broken)
    monkeypatch.setattr("store.inspect_cache", broken, raising=False)
    r = invoke(["inspect", world.cache])
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and "ZeroDivisionError: an internal mistake" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bug: this is a bug in facetclip")


def test_an_oserror_says_what_to_do_in_one_line(monkeypatch, world):
    """I/O failures the CLI cannot foresee (here: the disk fills up) are one line with advice."""
    import errno

    import store.inspect

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(world.cache / "x"))

    monkeypatch.setattr(store.inspect, "inspect_cache", full)
    monkeypatch.setattr("store.inspect_cache", full, raising=False)
    check(invoke(["inspect", world.cache]),
          Refused(r"x: No space left on device; the disk is full; free space or write "
                  r"elsewhere, then run the same command again"))  # fmt: skip


# --- img2dataset output with failed downloads --------------------------------------------------


def _expected_by_status(files: list[Path]) -> tuple[list[str], dict[str, str]]:
    """(successful keys, failed key -> status) from img2dataset's Parquet, read with pyarrow."""
    t = pa.concat_tables(pq.read_table(f, columns=["key", "status"]) for f in files)
    ok = [k for k, s in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
          if s == "success"]  # fmt: skip
    failed = {k: s for k, s in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
              if s != "success"}  # fmt: skip
    return ok, failed


def _skipped_rows(out: Path) -> dict[str, str]:
    t = pa.concat_tables(pq.read_table(p) for p in sorted((out / "skipped").glob("*.parquet")))
    return dict(zip(t["key"].to_pylist(), t["reason"].to_pylist(), strict=True))


@pytest.mark.parametrize("layout", ["webdataset-metadata", "parquet"])
def test_img2dataset_failed_downloads_are_skipped_with_their_status(layout, world, tmp_path):
    """img2dataset's Parquet (the metadata beside its tars, or its Parquet output with image
    bytes) lists failed downloads with their status: embed skips exactly those, listing each."""
    from eval.synth import SynthConfig, write_synth

    if layout == "parquet":
        data = tmp_path / "synth"
        write_synth(data, SynthConfig(n=60, seed=3, image_size=16, format="parquet",
                                      n_retrieval=2, n_zeroshot_per_class=1), progress=False)  # fmt: skip
        images = data / "images"
    else:
        images = world.images
    files = sorted(images.glob("*.parquet"))
    ok, failed = _expected_by_status(files)
    assert failed, "the fixture must hold failed downloads"
    out = tmp_path / "out"
    r = invoke(["embed", images, "--input-format", "parquet", "--model", world.model, "--out",
                out, "--recipe", "flame-long", "--no-progress"])  # fmt: skip
    check(r, Embedded(ok, {"failed download (failed_to_download)": len(failed)}), out)
    assert _skipped_rows(out) == {k: f"failed download ({s})" for k, s in failed.items()}


def test_webdataset_samples_whose_json_says_failed_are_skipped(world, tmp_path):
    """A webdataset sample whose .json status is not "success" (with or without an image) is
    a failed download: skipped and listed, its caption never embedded."""
    meta = lambda key, status: json.dumps({"key": key, "status": status}).encode()  # noqa: E731
    good = lambda key, text: {"jpg": b"\xff\xd8", "txt": text.encode(),  # noqa: E731
                              "json": meta(key, "success")}  # fmt: skip
    shard = tar(tmp_path / "w" / "00000.tar", [
        ("a1", good("a1", "A red star.")),
        ("a2", {"json": meta("a2", "failed_to_download")}),
        ("a3", {"jpg": b"\xff\xd8", "txt": b"A cube.", "json": meta("a3", "failed_to_resize")}),
        ("a4", good("a4", "A blue cube.")),
    ])  # fmt: skip
    out = tmp_path / "out"
    r = invoke(emb(world, tmp_path, shard.parent, "--column", "long_caption=txt"))
    check(r, Embedded(["a1", "a4"], {"failed download (failed_to_download)": 1,
                                     "failed download (failed_to_resize)": 1}), out)  # fmt: skip
    assert _skipped_rows(out) == {"a2": "failed download (failed_to_download)",
                                  "a3": "failed download (failed_to_resize)"}  # fmt: skip


# --- a property over generated caption tables --------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from(" \n\t"),
               max_size=12)  # fmt: skip
STR_KEYS, INT_KEYS = TEXT.filter(bool), st.integers(-3, 10**6)
BAD_KEYS = st.one_of(st.just(""), st.floats(allow_nan=True), st.booleans(), st.none(),
                     st.lists(st.integers(0, 3), max_size=2),
                     st.dictionaries(TEXT, st.integers(), max_size=1))  # fmt: skip
BAD_CAPTIONS = st.one_of(st.sampled_from(["", " ", "\n\t"]), st.none(), st.integers(),
                         st.booleans(), st.lists(TEXT, max_size=2))  # fmt: skip


@st.composite
def caption_tables(draw) -> list[tuple[object, object]]:
    """1-8 rows of (key, caption). Keys are strings, integers or both; a quarter of the tables
    hold hostile keys and some repeat a key; half hold hostile captions (blank, null, numbers,
    booleans, arrays)."""
    n = draw(st.integers(1, 8))
    keys = {"str": STR_KEYS, "int": INT_KEYS, "both": STR_KEYS | INT_KEYS}[
        draw(st.sampled_from(["str", "int", "both"]))
    ]
    unique = draw(st.lists(keys, min_size=n, max_size=n, unique_by=str))
    hostile_keys, hostile_captions = draw(st.integers(0, 3)) == 0, draw(st.booleans())
    rows = []
    for key in unique:
        if hostile_keys and draw(st.integers(0, 2)) == 0:
            key = draw(BAD_KEYS)
        elif rows and draw(st.integers(0, 9)) == 0:
            key = draw(st.sampled_from([k for k, _ in rows]))
        bad = hostile_captions and draw(st.integers(0, 2)) == 0
        rows.append((key, draw(BAD_CAPTIONS if bad else TEXT.filter(str.strip))))
    return rows


def oracle(rows, fmt: str) -> tuple[str, list[str], Counter]:
    """What embed must do, from the documented rules alone: ("refuse", ...) or ("embed",
    keys, skip reasons counted)."""
    keys, captions = [k for k, _ in rows], [c for _, c in rows]
    if fmt == "csv":  # text only: an int is its digits, an empty cell is a missing value
        keys = [None if k == "" else k for k in keys]
        captions = [None if c == "" else str(c) if type(c) is int else c for c in captions]
    if fmt == "parquet":
        column_types = {type(c) for c in captions} - {type(None)}
        if column_types - {str}:
            return "refuse", [], Counter()
    norm = []
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, str | int) or k == "":
            return "refuse", [], Counter()
        norm.append(str(k))
    if len(set(norm)) < len(norm):
        return "refuse", [], Counter()
    embedded, skipped = [], Counter()
    for k, c in zip(norm, captions, strict=True):
        if c is None:
            skipped["null caption in long_caption"] += 1
        elif not isinstance(c, str):
            kind = {bool: "boolean", int: "integer", list: "array"}[type(c)]
            skipped[f"non-text caption in long_caption ({kind})"] += 1
        elif not c.strip():
            skipped["empty caption in long_caption"] += 1
        else:
            embedded.append(k)
    return "embed", embedded, skipped


def write_table(rows, fmt: str, path: Path) -> Path | None:
    """The rows in ``fmt``; None when the format cannot hold them (mixed Parquet types, a
    CSV of anything but text and integers)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"key": k, "long_caption": c}) + "\n" for k, c in rows))
        return path
    if fmt == "parquet":
        try:
            pq.write_table(pa.table({"key": pa.array([k for k, _ in rows]),
                                     "long_caption": pa.array([c for _, c in rows])}), path)  # fmt: skip
        except (pa.ArrowException, OverflowError):
            return None
        return path
    values = [v for row in rows for v in row]
    if any(not (v is None or isinstance(v, str) or type(v) is int) for v in values):
        return None
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "long_caption"])
        w.writerows(["" if v is None else v for v in row] for row in rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(rows=caption_tables())
def test_embed_refuses_in_one_line_or_embeds_exactly_the_valid_rows(rows, fmt, world, tmp_path):
    """Over generated tables: embed refuses in one line exactly when a key breaks the rule
    (or a Parquet column is not text), else the cache holds exactly the rows with text
    captions, each key once, and the others are counted by reason."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = write_table(rows, fmt, folder / f"c.{fmt}")
    if path is None:
        return
    verdict, keys, skipped = oracle(rows, fmt)
    out = folder / "out"
    r = invoke(["embed", path, "--model", world.model, "--out", out, "--recipe", "flame-long",
                "--no-progress"])  # fmt: skip
    if verdict == "refuse":
        check(r, Refused(r"has no key|not a string or an integer|duplicate key|is of type"))
    else:
        check(r, Embedded(keys, dict(skipped)), out)


# --- what a Ray failure says ------------------------------------------------------------------

# Ray 2.60's memory monitor, as its raylet words a kill (the text a killed worker's error carries).
OOM_TEXT = (
    "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.5, "
    "ID: 6f1c) where the task (actor ID: 9a2b, name=RayTrainWorker.__init__, pid=32066, memory "
    "used=0.75GB) was running was 22.61GB / 23.43GB (0.965), which exceeds the memory usage "
    "threshold of 0.95. Ray killed this worker (ID: 1d2e) because it was the most recently "
    "scheduled task; to see more information about memory usage on this node, use `ray logs "
    "raylet.out -ip 10.0.0.5`.\nTop 10 memory users:\nPID\tMEM(GB)\tCOMMAND\n32066\t0.75\t"
    "ray::RayTrainWorker\nRefer to the documentation on how to address the out of memory issue"
)


def test_a_ray_memory_kill_is_one_line_with_the_setting_to_change():
    from ray.exceptions import OutOfMemoryError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from store.cluster import ray_failure_cause

    failure = WorkerGroupError(
        "Training failed due to worker errors", {1: OutOfMemoryError(OOM_TEXT)}
    )
    line = ray_failure_cause(failure)
    assert "\n" not in line
    assert line.startswith("Ray's memory monitor killed a worker because the machine was low on")
    assert "in use was 22.61GB of 23.43GB, 0.965; the threshold is 0.95" in line
    assert "RAY_memory_usage_threshold=0.98" in line and "RAY_memory_monitor_refresh_ms=0" in line


def test_other_ray_failures_say_their_first_line_or_the_users_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from store.cluster import ray_failure_cause
    from store.errors import CacheError

    try:
        try:
            raise ValueError("bad pixel layout\n  with more detail\nand more")
        except ValueError as inner:
            raise RuntimeError("ray::RayTrainWorker.run() (pid=1)\n  File x") from inner
    except RuntimeError as e:
        wrapped = WorkerGroupError("Training failed due to worker errors", {0: e})
    assert ray_failure_cause(wrapped) == "ValueError: bad pixel layout"
    user = WorkerGroupError(
        "x", {0: CacheError("part-00003.parquet holds zero vectors; run verify")}
    )
    assert ray_failure_cause(user) == "part-00003.parquet holds zero vectors; run verify"


def test_training_refuses_zero_vectors_a_damaged_cache_holds(world, tmp_path):
    """Training reads the cache row group by row group (in Ray tasks); a zero vector, which
    embed never writes, stops it naming the shard, instead of training on nothing."""
    from store.cache import Cache
    from store.errors import CacheError
    from train.data import UnitReader

    cache = Cache.open(damaged_cache(world, tmp_path, 1, columns="all"))
    layout = cache.manifest.layout
    reader = UnitReader([str(p) for p in cache.shard_paths], list(layout["vector_names"]),
                        layout["dtype"], "webdataset", [], None)  # fmt: skip
    keys = [pq.read_table(p, columns=["key"]).column("key").to_pylist() for p in cache.shard_paths]
    sound = reader.vectors(0, 0, np.arange(len(keys[0])), keys[0])
    assert sound.shape[:2] == (len(keys[0]), len(reader.facets)) and np.all(sound.any(axis=2))
    with pytest.raises(CacheError, match=r"part-00001\.parquet: 20 row\(s\) hold all-zero"):
        reader.vectors(1, 0, np.arange(len(keys[1])), keys[1])
