"""`facetclip verify`: check a cache against its manifest, and optionally repair it.

What is checked, streaming (memory holds one column of one row group, plus 8 bytes a row for
the duplicate-key hashes):

- the manifest: each entry well formed, named after its index, its input range where
  `embed` puts it and equal to rows + skipped;
- each shard: present; opens as Parquet (else truncated / unreadable); size and sha256 as
  recorded; row count; key-value metadata (recipe equal to recipe.toml, layout equal to the
  manifest's) and schema as the layout implies;
- each vector: finite (no NaN / Inf) and not null;
- keys: unique within and across shards;
- skipped/ files: present, readable, as many rows as the manifest says;
- stray files: Parquet files the manifest does not list (orphans) and temp files
  (``.NAME.tmp-PID``) of an interrupted write.

Repair (``repair=True``) first rewrites the manifest atomically without the entries of bad
shards, then deletes their files, the orphans and the temp files. A shard without a manifest
entry is exactly what ``facetclip embed`` recomputes, so rerunning the same embed command
afterwards restores the dropped shards and nothing else. Do not repair while an embed is
writing to the same cache.

>>> report = verify_cache("cache/")
>>> report.ok, [p.kind for p in report.problems]
(True, [])
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.cache import (
    MANIFEST_FILE,
    RECIPE_FILE,
    SHARDS_DIR,
    SKIPPED_DIR,
    SKIPPED_SCHEMA,
    Cache,
    Manifest,
    ShardEntry,
    atomic_write_bytes,
    recipe_diff,
    sha256_file,
    shard_name,
    write_parquet_atomic,
)
from store.errors import CacheError
from store.format import META_LAYOUT, META_RECIPE, SCALE_SUFFIX, shard_schema

# Problems that make a shard unusable: repair drops the shard so that `embed` recomputes it.
SHARD_KINDS = frozenset(
    {
        "bad_manifest_entry",
        "missing_shard",
        "truncated_shard",
        "unreadable_shard",
        "checksum_mismatch",
        "row_count_mismatch",
        "foreign_shard",
        "layout_mismatch",
        "schema_mismatch",
        "nonfinite_vectors",
        "duplicate_keys",
        "missing_skipped_file",
        "bad_skipped_file",
    }
)
_PART = re.compile(r"part-\d{5,}\.parquet")  # names embed writes; the only ones repair deletes
_SHOWN = 5  # keys / shards named in a message


@dataclass
class Problem:
    """One thing wrong with a cache. ``shard`` names the manifest shard it concerns, if any."""

    kind: str
    shard: str | None
    message: str
    fix: str
    path: str | None = None  # the file concerned, relative to the cache
    repaired: bool = False


@dataclass
class VerifyReport:
    path: Path
    shards: int  # manifest entries checked
    rows: int  # rows the manifest lists
    problems: list[Problem] = field(default_factory=list)
    repair: bool = False  # whether repair was asked for
    rerun: str = ""  # how to recompute dropped shards
    dropped: list[str] = field(default_factory=list)  # shards repair removed from the manifest
    deleted: list[str] = field(default_factory=list)  # files repair deleted (relative paths)

    @property
    def ok(self) -> bool:
        """No problem found (the CLI exits 0, else 1; also after a repair, which leaves the
        dropped shards to be recomputed by `embed`)."""
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["ok"] = self.ok
        return d


def verify_cache(path: str | Path, repair: bool = False) -> VerifyReport:
    """Check every file of the cache at ``path``; with ``repair``, drop what is bad.

    Raises CacheError when ``path`` is not a cache or its manifest / recipe cannot be read:
    nothing else can be checked then.
    """
    root = Path(path)
    cache = _open(root)
    m = cache.manifest
    rerun = _rerun_hint(cache)
    drop_fix = f"run `facetclip verify --repair {root}` (drops this shard), then {rerun}"
    rows = sum(s.rows for s in m.shards if isinstance(s.rows, int))
    report = VerifyReport(root, len(m.shards), rows, repair=repair, rerun=rerun)
    problems = report.problems

    good = _check_manifest(m, problems, drop_fix)
    expected = _expected_schema(cache)
    recipes: dict[str, dict | None] = {}  # shard -> recipe in its metadata
    scan: list[ShardEntry] = []  # shards whose bytes are as recorded: their rows get scanned
    for entry in good:
        intact, recipe = _check_file(root, entry, cache, expected, problems, drop_fix)
        recipes[entry.name] = recipe
        if intact:
            scan.append(entry)
        _check_skipped(root, entry, problems, drop_fix)
    _check_recipes(cache, recipes, problems, drop_fix)
    bad = {p.shard for p in problems if p.kind in SHARD_KINDS and "skipped" not in p.kind}
    scan = [e for e in scan if e.name not in bad]

    hashes = {}
    for entry in scan:
        h = _scan_rows(root / SHARDS_DIR / entry.name, entry, m.layout, problems, drop_fix)
        if h is not None:
            hashes[entry.name] = h
    _check_duplicates(root, hashes, problems, drop_fix)
    _check_strays(root, {s.name for s in m.shards if isinstance(s.name, str)}, problems)

    if repair:
        _repair(cache, report)
    return report


# --- opening ----------------------------------------------------------------------------


def _open(root: Path) -> Cache:
    """Cache.open, with messages that do not send the user back to `verify`."""
    hint = (
        "the shards cannot be trusted without it; restore it from a backup, or delete "
        f"{root} and rerun `facetclip embed`"
    )
    mpath, rpath = root / MANIFEST_FILE, root / RECIPE_FILE
    if root.is_dir() and mpath.is_file():
        try:
            m = Manifest.from_json(mpath.read_text())
            if not isinstance(m.layout, dict) or not isinstance(m.shard_rows, int):
                raise ValueError("no layout or shard_rows")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise CacheError(f"{mpath} is unreadable ({e}); {hint}") from None
    if root.is_dir() and rpath.is_file():
        try:
            tomllib.loads(rpath.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"{rpath} is unreadable ({e}); {hint}") from None
    return Cache.open(root)


def _rerun_hint(cache: Cache) -> str:
    command = "embed-images" if cache.recipe.get("kind") == "image" else "embed"
    src = cache.manifest.input.get("path", "IMAGES" if command == "embed-images" else "CAPTIONS")
    return (
        f"rerun the same `facetclip {command} {src} --out {cache.root} ...` command: "
        "it recomputes exactly the shards missing from the manifest"
    )


# --- manifest ---------------------------------------------------------------------------


def _check_manifest(m: Manifest, problems: list[Problem], fix: str) -> list[ShardEntry]:
    """Entries that are well formed and consistent; a problem for each other one."""
    ints = ("index", "rows", "bytes", "input_start", "input_end", "skipped")
    names = defaultdict(list)
    for e in m.shards:
        names[e.name if isinstance(e.name, str) else repr(e.name)].append(e)
    good = []
    for e in m.shards:
        why = None
        if not isinstance(e.name, str) or not all(
            isinstance(getattr(e, k), int) and getattr(e, k) >= 0 for k in ints
        ):
            why = "is malformed (a field is missing, negative or of the wrong type)"
        elif e.name != shard_name(e.index):
            why = f"names file {e.name!r} but has index {e.index} ({shard_name(e.index)})"
        elif len(names[e.name]) > 1:
            why = f"appears {len(names[e.name])} times"
        elif e.input_start != e.index * m.shard_rows:
            why = (
                f"starts at input row {e.input_start}, but shard {e.index} of "
                f"{m.shard_rows} rows starts at {e.index * m.shard_rows}"
            )
        elif e.input_end - e.input_start != e.rows + e.skipped:
            why = (
                f"covers input rows [{e.input_start}, {e.input_end}) but lists "
                f"{e.rows} rows + {e.skipped} skipped"
            )
        if why is None:
            good.append(e)
        else:
            name = e.name if isinstance(e.name, str) else None
            problems.append(Problem("bad_manifest_entry", name, f"manifest entry {why}", fix))
    return good


# --- shard files ------------------------------------------------------------------------


def _token_columns(recipe: dict) -> list[str]:
    # Recipe.columns: caption columns in first-use order (every one gets a token count).
    return list(dict.fromkeys(g.get("column") for g in recipe.get("groups", [])))


def _expected_schema(cache: Cache) -> pa.Schema | None:
    lay = cache.manifest.layout
    try:
        return shard_schema(
            lay["vector_names"],
            lay["dim"],
            lay["dtype"],
            lay["text_columns"],
            _token_columns(cache.recipe),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _schema_diff(got: pa.Schema, want: pa.Schema) -> str:
    g = {f.name: f for f in got}
    w = {f.name: f for f in want}
    parts = []
    if missing := [n for n in w if n not in g]:
        parts.append(f"missing column(s) {missing}")
    if extra := [n for n in g if n not in w]:
        parts.append(f"unexpected column(s) {extra}")
    for n in w:
        if n in g and not g[n].equals(w[n]):
            parts.append(f"column {n!r} is {g[n].type}, expected {w[n].type}")
    if not parts and got.names != want.names:
        parts.append("columns in another order")
    return "; ".join(parts[:4])


def _check_file(
    root: Path,
    entry: ShardEntry,
    cache: Cache,
    expected: pa.Schema | None,
    problems: list[Problem],
    fix: str,
) -> tuple[bool, dict | None]:
    """File-level checks of one shard -> (bytes as recorded, the recipe in its metadata)."""
    path = root / SHARDS_DIR / entry.name
    rel = f"{SHARDS_DIR}/{entry.name}"

    def problem(kind: str, message: str) -> None:
        problems.append(Problem(kind, entry.name, f"{rel}: {message}", fix))

    if not path.is_file():
        problem("missing_shard", f"listed in the manifest ({entry.rows} rows) but missing")
        return False, None
    size = path.stat().st_size
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        if size < entry.bytes:
            problem(
                "truncated_shard",
                f"truncated: {size:,} of {entry.bytes:,} bytes; unreadable as Parquet ({e})",
            )
        else:
            problem("unreadable_shard", f"unreadable as Parquet ({e})")
        return False, None

    intact = True
    if size != entry.bytes:
        problem(
            "checksum_mismatch",
            f"checksum mismatch: {size:,} bytes, the manifest recorded {entry.bytes:,}",
        )
        intact = False
    elif sha256_file(path) != entry.sha256:
        problem(
            "checksum_mismatch",
            "checksum mismatch: sha256 differs from the manifest's (the file changed after it "
            "was written: disk or copy corruption, or an edit)",
        )
        intact = False
    if pf.metadata.num_rows != entry.rows:
        problem(
            "row_count_mismatch",
            f"has {pf.metadata.num_rows} rows, the manifest recorded {entry.rows}",
        )
        intact = False

    meta = pf.schema_arrow.metadata or {}
    try:
        recipe = tomllib.loads(meta[META_RECIPE].decode())
    except (KeyError, UnicodeDecodeError, ValueError):
        problem(
            "foreign_shard",
            "not a facetclip shard of this cache: no readable recipe in its metadata",
        )
        return False, None
    if recipe != cache.recipe:
        return intact, recipe  # judged with the other shards' recipes in _check_recipes
    try:
        layout = json.loads(meta[META_LAYOUT])
    except (KeyError, ValueError):
        layout = None
    if layout != cache.manifest.layout:
        problem(
            "layout_mismatch",
            f"its layout {layout} differs from the manifest's {cache.manifest.layout}",
        )
        return False, recipe
    got = pf.schema_arrow.remove_metadata()
    if expected is not None and not got.equals(expected):
        problem(
            "schema_mismatch", f"schema differs from the layout's: {_schema_diff(got, expected)}"
        )
        return False, recipe
    return intact, recipe


def _check_recipes(
    cache: Cache, recipes: dict[str, dict | None], problems: list[Problem], fix: str
) -> None:
    """Shards whose recipe differs from recipe.toml. If no shard agrees with recipe.toml but
    all agree with each other, recipe.toml is the odd one out: one problem, not N."""
    readable = {n: r for n, r in recipes.items() if r is not None}
    foreign = {n: r for n, r in readable.items() if r != cache.recipe}
    if not foreign:
        return

    def diff(recipe: dict) -> str:
        return "; ".join(recipe_diff(cache.recipe, recipe, ("recipe.toml has", "the shard"))[:3])

    first = next(iter(foreign.values()))
    if len(foreign) == len(readable) and all(r == first for r in foreign.values()):
        problems.append(
            Problem(
                "recipe_mismatch",
                None,
                f"recipe.toml differs from the recipe stored in every shard ({diff(first)})",
                "recipe.toml was edited or replaced after embedding: restore it (each shard's "
                "metadata key `facetclip.recipe` holds the original); if the shards are the "
                f"wrong ones, delete {cache.root} and rerun `facetclip embed`",
            )
        )
        return
    for name, recipe in foreign.items():
        problems.append(
            Problem(
                "foreign_shard",
                name,
                f"{SHARDS_DIR}/{name}: made with another recipe ({diff(recipe)}); its vectors do not "
                "belong in this cache",
                fix,
            )
        )


def _check_skipped(root: Path, entry: ShardEntry, problems: list[Problem], fix: str) -> None:
    path = root / SKIPPED_DIR / entry.name
    rel = f"{SKIPPED_DIR}/{entry.name}"
    if not path.is_file():
        if entry.skipped == 0:  # nothing lost: repair writes it again, empty
            problems.append(
                Problem(
                    "missing_skipped_file",
                    None,
                    f"{rel} (empty: shard {entry.name} skipped no rows) is missing",
                    f"run `facetclip verify --repair {root}`: it writes the empty file again",
                    rel,
                )
            )
            return
        problems.append(
            Problem(
                "missing_skipped_file",
                entry.name,
                f"{rel} (the {entry.skipped} skipped rows of shard {entry.name}) is missing",
                fix,
                rel,
            )
        )
        return
    try:
        n = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        problems.append(
            Problem("bad_skipped_file", entry.name, f"{rel} is unreadable ({e})", fix, rel)
        )
        return
    if n != entry.skipped:
        problems.append(
            Problem(
                "bad_skipped_file",
                entry.name,
                f"{rel} has {n} rows, the manifest recorded {entry.skipped} skipped",
                fix,
                rel,
            )
        )


# --- rows -------------------------------------------------------------------------------


def _scan_rows(
    path: Path, entry: ShardEntry, layout: dict, problems: list[Problem], fix: str
) -> np.ndarray | None:
    """NaN / Inf / null scan of every vector, one column of one row group at a time.
    Returns the 64-bit hashes of the shard's keys (for the duplicate check)."""
    names = list(layout["vector_names"])
    scales = [n + SCALE_SUFFIX for n in names] if layout["dtype"] == "int8" else []
    hashes, bad_keys, bad_cols, n_bad = [], [], set(), 0
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.metadata.num_row_groups):
            keys = pf.read_row_group(rg, columns=["key"]).column(0).to_pylist()
            hashes.append(np.fromiter(map(hash, keys), np.int64, len(keys)))
            bad = np.zeros(len(keys), bool)
            for col in names + scales:
                a = pf.read_row_group(rg, columns=[col]).column(0).combine_chunks()
                row_bad = a.is_null().to_numpy(zero_copy_only=False)
                if col in names:  # the child values, null slots included (they read as NaN)
                    d = a.type.list_size
                    a = a.values.slice(a.offset * d, len(a) * d)
                v = a.to_numpy(zero_copy_only=False).reshape(len(keys), -1)
                if v.dtype.kind == "f":
                    row_bad |= ~np.isfinite(v).all(axis=1)
                if row_bad.any():
                    bad |= row_bad
                    bad_cols.add(col)
            n_bad += int(bad.sum())
            bad_keys += [keys[i] for i in np.flatnonzero(bad)[: _SHOWN - len(bad_keys)]]
    except (OSError, pa.ArrowException) as e:
        problems.append(
            Problem(
                "unreadable_shard", entry.name, f"{SHARDS_DIR}/{entry.name}: unreadable ({e})", fix
            )
        )
        return None
    if n_bad:
        problems.append(
            Problem(
                "nonfinite_vectors",
                entry.name,
                f"{SHARDS_DIR}/{entry.name}: {n_bad} row(s) with NaN/Inf or null vectors "
                f"(in {sorted(bad_cols)}), e.g. keys {bad_keys}",
                fix,
            )
        )
    return np.concatenate(hashes) if hashes else np.zeros(0, np.int64)


def _check_duplicates(
    root: Path, hashes: dict[str, np.ndarray], problems: list[Problem], fix: str
) -> None:
    """Keys that occur twice, within or across shards. Pass one compares 64-bit hashes;
    pass two re-reads only the keys of shards holding a suspect hash, so a hash collision
    cannot cause a false report."""
    if not hashes:
        return
    h = np.sort(np.concatenate(list(hashes.values())))
    suspects = np.unique(h[1:][h[1:] == h[:-1]])
    if not suspects.size:
        return
    where = defaultdict(list)  # key -> shards holding it, once per occurrence
    for name, hs in hashes.items():
        if not np.isin(hs, suspects).any():
            continue
        keys = pq.read_table(root / SHARDS_DIR / name, columns=["key"]).column(0).to_pylist()
        for k, kh in zip(keys, hs, strict=True):
            if kh in suspects:
                where[k].append(name)
    dups = {k: shards for k, shards in where.items() if len(shards) > 1}
    by_shard = defaultdict(list)
    for k, shards in dups.items():
        for s in dict.fromkeys(shards):
            by_shard[s].append(k)
    for name, keys in sorted(by_shard.items()):
        others = sorted({s for k in keys for s in dups[k]} - {name})
        within = [k for k in keys if dups[k].count(name) > 1]
        where_txt = []
        if others:
            where_txt.append(f"also in {others[:_SHOWN]}")
        if within:
            where_txt.append(f"{len(within)} repeated within the shard")
        problems.append(
            Problem(
                "duplicate_keys",
                name,
                f"{SHARDS_DIR}/{name}: {len(keys)} duplicate key(s), e.g. {keys[:_SHOWN]} "
                f"({', '.join(where_txt)})",
                fix,
            )
        )


# --- stray files ------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a temp file's writer may still be busy)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True  # it exists, owned by someone else
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _temp_pid(name: str) -> int | None:
    suffix = name.rsplit(".tmp-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def _check_strays(root: Path, known: set[str], problems: list[Problem]) -> None:
    for d in (SHARDS_DIR, SKIPPED_DIR):
        for p in sorted((root / d).glob("*.parquet")):
            if p.name in known or p.name.startswith("."):
                continue
            fix = (
                f"delete {d}/{p.name} (`facetclip verify --repair` does): unfinished work of an "
                "interrupted embed, which `embed` recomputes"
                if _PART.fullmatch(p.name)
                else f"move {d}/{p.name} out of the cache: readers of {d}/*.parquet would see it"
            )
            rel = f"{d}/{p.name}"
            problems.append(Problem("orphan_file", None, f"{rel} is not in the manifest", fix, rel))
    for d in (".", SHARDS_DIR, SKIPPED_DIR):
        for p in sorted((root / d).glob(".*.tmp-*")):
            rel = p.relative_to(root).as_posix()
            pid = _temp_pid(p.name)
            alive = pid is not None and _pid_alive(pid)
            problems.append(
                Problem(
                    "temp_file",
                    None,
                    f"{rel} is a temp file left by an interrupted write"
                    + (
                        f" (process {pid} is still running: maybe an embed writing it)"
                        if alive
                        else ""
                    ),
                    f"if no `facetclip embed` is writing to this cache, delete {rel} "
                    "(`facetclip verify --repair` or resuming `embed` does)",
                    rel,
                )
            )


# --- repair -----------------------------------------------------------------------------


def _repair(cache: Cache, report: VerifyReport) -> None:
    """Drop bad shards from the manifest (atomically, first), then delete their files, the
    orphans and the temp files. A crash in between leaves only orphans, which `embed`
    removes on resume."""
    root = cache.root
    drop = {p.shard for p in report.problems if p.kind in SHARD_KINDS and p.shard is not None}
    for p in report.problems:
        if p.kind == "missing_skipped_file" and p.shard is None and p.path:
            write_parquet_atomic(SKIPPED_SCHEMA.empty_table(), root / p.path)
            p.repaired, p.fix = True, "written again, empty"
    # Entries whose name is not even a string are malformed: dropped too.
    keep = [e for e in cache.manifest.shards if isinstance(e.name, str) and e.name not in drop]
    if len(keep) != len(cache.manifest.shards):
        report.dropped = sorted(
            {e.name if isinstance(e.name, str) else repr(e.name) for e in cache.manifest.shards}
            - {e.name for e in keep}
        )
        cache.manifest.shards = keep
        atomic_write_bytes(root / MANIFEST_FILE, cache.manifest.to_json().encode())
    for p in report.problems:
        if p.kind in SHARD_KINDS and (p.shard is not None or p.kind == "bad_manifest_entry"):
            p.repaired = True
            p.fix = f"dropped from the manifest; {report.rerun}"
    for name in report.dropped:
        if _PART.fullmatch(name):  # never follow a path a damaged manifest made up
            for d in (SHARDS_DIR, SKIPPED_DIR):
                _delete(root, root / d / name, report)
    for p in report.problems:
        if (
            p.kind == "orphan_file"
            and _PART.fullmatch(Path(p.path).name)
            or (p.kind == "temp_file" and not _pid_alive(_temp_pid(p.path) or 0))
        ):
            _delete(root, root / p.path, report)
            p.repaired, p.fix = True, "deleted"


def _delete(root: Path, path: Path, report: VerifyReport) -> None:
    if path.is_file():
        path.unlink()
        report.deleted.append(path.relative_to(root).as_posix())


# --- rendering --------------------------------------------------------------------------


def render_report(report: VerifyReport):
    """A rich renderable: each problem with its fix, then a verdict."""
    from rich.console import Group
    from rich.text import Text

    lines = []
    for p in report.problems:
        line = Text.assemble(
            ("repaired " if p.repaired else "problem ", "green" if p.repaired else "bold red"),
            (p.kind + " ", "dim"),
            p.message,
        )
        lines += [line, Text("    fix: " + p.fix, style="dim" if p.repaired else "yellow")]
    head = f"{report.path} ({report.shards} shard(s), {report.rows:,} rows)"
    if report.ok:
        lines.append(Text.assemble(("ok ", "bold green"), f"{head}: every check passed"))
    else:
        n_fixed = sum(p.repaired for p in report.problems)
        fixed = f", {n_fixed} repaired" if report.repair else ""
        lines.append(
            Text.assemble((f"{len(report.problems)} problem(s) ", "bold red"), f"in {head}{fixed}")
        )
    if report.dropped:
        lines.append(
            Text(
                f"repair dropped {len(report.dropped)} shard(s) from the manifest; {report.rerun}",
                style="yellow",
            )
        )
    if report.deleted:
        lines.append(Text(f"repair deleted {len(report.deleted)} file(s)", style="dim"))
    return Group(*lines)
