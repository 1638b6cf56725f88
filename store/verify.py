"""`facetclip verify`: check a cache against its manifest and its recipe, and optionally repair it.

A manifest checksum proves only that a file is the one `embed` recorded. Damage that rewrote a
shard as valid Parquet and resealed the manifest (recomputed its sha256) passes that test, so
every row is also checked against what the recipe and layout promise.

The damage verify catches, by kind (``Problem.kind``); each row-level problem names the shard,
the columns, how many rows, and the first rows (row number in the file and key):

=========================  =====================================================================
kind                       what is wrong
=========================  =====================================================================
bad_manifest_entry         an entry is malformed, misnamed, repeated, or its input range is off
bad_layout                 the manifest's layout is malformed, contradicts recipe.toml (vector
                           names, dtype, text columns) or every shard's metadata
missing_shard              a listed shard file is absent
truncated_shard            a shard is shorter than recorded and no longer Parquet
unreadable_shard           a shard is not Parquet (or fails while its rows are read)
checksum_mismatch          size or sha256 differs from the manifest's
row_count_mismatch         a shard's row count differs from the manifest's
foreign_shard              a shard made with another recipe, or with no facetclip metadata
recipe_mismatch            recipe.toml differs from the recipe stored in every shard
layout_mismatch            a shard's metadata layout differs from the manifest's
schema_mismatch            a column is missing, extra, or of another type, dimension or dtype
nonfinite_vectors          NaN / Inf / null in a vector or an int8 scale
zero_vectors               an all-zero vector (no LLM hidden state is; a zeroed column is)
unnormalized_vectors       the recipe normalises, but a vector's norm is off 1 by more than its
                           storage dtype's rounding allows (float32 1e-4, float16 2e-3, int8
                           sqrt(D) * scale / 2, the worst case of rounding to the int8 grid)
bad_scales                 an int8 scale <= 0, or a vector not on the encoder's grid (its largest
                           |q| must be 127)
bad_keys                   a null or empty key (embed never writes one)
duplicate_keys             a key occurs twice, within a shard or across shards
bad_token_counts           a negative token count, or a ``truncated`` flag that disagrees with the
                           counts and the recipe's ``max_caption_tokens``
missing_skipped_file       a shard's skipped/ file is absent
bad_skipped_file           a skipped/ file is unreadable or has another row count
orphan_file                a Parquet file the manifest does not list
temp_file                  a temp file (``.NAME.tmp-PID…``) of an interrupted write
=========================  =====================================================================

Not caught: damage that leaves every value plausible (two facet columns swapped, a vector
replaced by another unit vector); finding that needs the model, i.e. embedding rows again.

Speed: streaming, one column of one row group at a time (memory: that, plus 8 bytes a row for
the duplicate-key hashes). Reading is cheaper than the sha256 every shard needs anyway.

Repair (``repair=True``) takes the cache's writer lock (refused while an ``embed`` writes the
cache), rewrites the manifest atomically without the entries of bad shards (every kind above
that names a shard), then deletes their files, the orphans and the temp files. A shard without
a manifest entry is exactly what ``facetclip embed`` recomputes, so rerunning the same embed
command afterwards restores the dropped shards and nothing else.

>>> report = verify_cache("cache/")
>>> report.ok, [p.kind for p in report.problems]
(True, [])
"""

from __future__ import annotations

import json
import re
import socket
import tomllib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.cache import (
    LOCK_FILE,
    MANIFEST_FILE,
    RECIPE_FILE,
    SHARDS_DIR,
    SKIPPED_DIR,
    SKIPPED_SCHEMA,
    Cache,
    CacheLock,
    Manifest,
    ShardEntry,
    atomic_write_bytes,
    pid_alive,
    read_lock_record,
    recipe_diff,
    sha256_file,
    shard_name,
    write_parquet_atomic,
)
from store.errors import CacheError
from store.format import (
    META_LAYOUT,
    META_RECIPE,
    SCALE_SUFFIX,
    TOKENS_PREFIX,
    VECTOR_DTYPES,
    shard_schema,
)

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
        "zero_vectors",
        "unnormalized_vectors",
        "bad_scales",
        "bad_keys",
        "duplicate_keys",
        "bad_token_counts",
        "missing_skipped_file",
        "bad_skipped_file",
    }
)
_PART = re.compile(r"part-\d{5,}\.parquet")  # names embed writes; the only ones repair deletes
_SHOWN = 5  # keys / shards / rows named in a message
# Largest |norm - 1| a normalised vector may show after storage rounding. float16 rounds each
# component with relative error <= 2^-11, so the norm moves by <= 4.9e-4 (subnormals add
# < 1e-5 up to D = 100k); float32 leaves float32 arithmetic error. int8's bound is per row
# (sqrt(D) * scale / 2, see _norm_tolerance).
_NORM_TOL = {"float32": 1e-4, "float16": 2e-3}


@dataclass
class Problem:
    """One thing wrong with a cache. ``shard`` names the manifest shard it concerns, if any."""

    kind: str
    shard: str | None
    message: str
    fix: str
    path: str | None = None  # the file concerned, relative to the cache
    repaired: bool = False
    columns: list[str] = field(default_factory=list)  # the columns affected (row-level kinds)
    count: int = 0  # rows affected (row-level kinds)
    rows: list[int] = field(default_factory=list)  # the first rows affected: row numbers in
    keys: list = field(default_factory=list)  # the shard file (from 0), and their keys


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
    writer: str = ""  # a live writer holding the cache's lock (read-only verify), if any

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
    nothing else can be checked then; and, with ``repair``, when another process (an
    ``embed``) holds the cache's writer lock.
    """
    root = Path(path)
    lock = None
    # A cache, or one an embed is creating (its lock file exists before its manifest).
    if repair and ((root / MANIFEST_FILE).is_file() or (root / LOCK_FILE).is_file()):
        lock = CacheLock.acquire(root, f"facetclip verify --repair {root}")
    try:
        report = _verify(root, repair)
    finally:
        if lock is not None:
            lock.release()
    return report


def _verify(root: Path, repair: bool) -> VerifyReport:
    cache = _open(root)
    m = cache.manifest
    rerun = _rerun_hint(cache)
    drop_fix = f"run `facetclip verify --repair {root}` (drops this shard), then {rerun}"
    rows = sum(s.rows for s in m.shards if isinstance(s.rows, int))
    report = VerifyReport(root, len(m.shards), rows, repair=repair, rerun=rerun)
    if not repair:
        report.writer = _live_writer(root)
    problems = report.problems

    good = _check_manifest(m, problems, drop_fix)
    layout_error = _layout_error(m.layout)
    expected = None if layout_error else _expected_schema(cache)
    recipes: dict[str, dict | None] = {}  # shard -> recipe in its metadata
    layouts: dict[str, object] = {}  # shard -> layout in its metadata (shards of this recipe)
    scan: list[ShardEntry] = []  # shards whose bytes are as recorded: their rows get scanned
    for entry in good:
        intact, recipe, layout = _check_file(root, entry, cache, expected, problems, drop_fix)
        recipes[entry.name] = recipe
        if recipe == cache.recipe:
            layouts[entry.name] = layout
        if intact:
            scan.append(entry)
        _check_skipped(root, entry, problems, drop_fix)
    recipe_ok = _check_recipes(cache, recipes, problems, drop_fix)
    layout_ok = _check_layouts(cache, layout_error, recipe_ok, layouts, problems, drop_fix)
    bad = {p.shard for p in problems if p.kind in SHARD_KINDS and "skipped" not in p.kind}
    scan = [e for e in scan if e.name not in bad] if layout_ok else []

    hashes = {}
    for entry in scan:
        h = _scan_rows(root / SHARDS_DIR / entry.name, entry, cache, problems, drop_fix)
        if h is not None:
            hashes[entry.name] = h
    _check_duplicates(root, hashes, problems, drop_fix)
    _check_strays(root, {s.name for s in m.shards if isinstance(s.name, str)}, problems)

    if repair:
        _repair(cache, report)
    return report


def _live_writer(root: Path) -> str:
    """Who holds the cache's writer lock, if a live process on this host does (read only:
    taking the lock, even for a moment, could refuse an embed that starts meanwhile)."""
    record = read_lock_record(root)
    if not record or not isinstance(record.get("pid"), int):
        return ""
    pid, host, command = record["pid"], record.get("host"), record.get("command", "?")
    if host != socket.gethostname():
        return f"process {pid} on {host} ({command}), if it still runs"
    return f"process {pid} ({command})" if pid_alive(pid) else ""


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
    src = cache.manifest.input.get("path", "CAPTIONS")
    return (
        f"rerun the same `facetclip embed {src} --out {cache.root} ...` command: "
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
    groups = recipe.get("groups")
    groups = groups if isinstance(groups, list) else []
    return list(dict.fromkeys(g.get("column") for g in groups if isinstance(g, dict)))


def _layout_error(lay: object) -> str | None:
    """Why the manifest's layout cannot describe a shard, or None."""
    if not isinstance(lay, dict):
        return "is not a table"
    names = lay.get("vector_names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        return f"has vector_names {names!r}, not a non-empty list of names"
    if len(set(names)) != len(names):
        return f"repeats a vector name in {names}"
    dim = lay.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return f"has dim {dim!r}, not a positive integer"
    if lay.get("dtype") not in VECTOR_DTYPES:
        return f"has dtype {lay.get('dtype')!r}, not one of {VECTOR_DTYPES}"
    texts = lay.get("text_columns")
    if not (isinstance(texts, list) and all(isinstance(c, str) for c in texts)):
        return f"has text_columns {texts!r}, not a list of names"
    return None


def _recipe_vector_names(recipe: dict) -> list[str] | None:
    # Recipe.vector_names (embed/prompts.py), from the recipe's dict: store/ cannot import embed/.
    pooling, names = recipe.get("pooling", "last"), []
    if pooling not in ("last", "mean") or not isinstance(recipe.get("groups"), list):
        # not an LLM-hidden-state recipe (P-Former prompts, image features name their vectors
        # their own way, in the layout only): nothing to compare
        return None
    for g in recipe["groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("facets", {}), dict):
            return None
        names += [g.get("mean_name", "mean")] if pooling == "mean" else list(g.get("facets", {}))
    return names


def _layout_vs_recipe(lay: dict, recipe: dict) -> list[str]:
    """How a well-formed layout contradicts the recipe: what the recipe fixes, the layout repeats."""
    out = []
    if "dtype" in recipe and recipe["dtype"] != lay["dtype"]:
        out.append(f"dtype {lay['dtype']!r}, but recipe.toml stores {recipe['dtype']!r}")
    names = _recipe_vector_names(recipe)
    if names is None:
        return out
    if names != lay["vector_names"]:
        out.append(f"vector names {lay['vector_names']}, but recipe.toml makes {names}")
    columns = _token_columns(recipe)
    if lay["text_columns"] not in ([], columns):
        out.append(f"text columns {lay['text_columns']}, but recipe.toml reads {columns}")
    return out


def _check_layouts(
    cache: Cache,
    layout_error: str | None,
    recipe_ok: bool,
    layouts: dict[str, object],
    problems: list[Problem],
    fix: str,
) -> bool:
    """The manifest's layout against its own form, recipe.toml and the shards' metadata layouts.
    When the manifest is the odd one out (malformed, contradicting the recipe, or every one of
    >= 2 shards agreeing on another layout): one ``bad_layout``, nothing dropped. Otherwise a
    ``layout_mismatch`` per differing shard. Returns whether rows can be checked against it."""
    lay = cache.manifest.layout
    reasons = [layout_error] if layout_error else []
    if not layout_error and recipe_ok:  # an edited recipe.toml is reported once, on its own
        reasons += _layout_vs_recipe(lay, cache.recipe)
    differing = {n: x for n, x in layouts.items() if x != lay}
    first = next(iter(differing.values()), None)
    if (
        len(differing) >= 2
        and len(differing) == len(layouts)
        and isinstance(first, dict)
        and all(x == first for x in differing.values())
    ):
        reasons.append(f"but every shard's metadata has {first}")
    else:
        for name, x in differing.items():
            problems.append(
                Problem(
                    "layout_mismatch",
                    name,
                    f"{SHARDS_DIR}/{name}: its layout {x} differs from the manifest's {lay}",
                    fix,
                )
            )
    if not reasons:
        return True
    problems.append(
        Problem(
            "bad_layout",
            None,
            f"manifest.json's layout {lay} " + "; ".join(reasons),
            "manifest.json was edited or damaged: restore its layout (each shard's metadata key "
            f"`facetclip.layout` holds the one it was written with), or delete {cache.root} and "
            "rerun `facetclip embed`",
            MANIFEST_FILE,
        )
    )
    return False


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
) -> tuple[bool, dict | None, object]:
    """File-level checks of one shard -> (bytes as recorded, the recipe in its metadata, the
    layout in its metadata). Recipe and layout are judged with the other shards' ones
    (_check_recipes, _check_layouts); the schema only when the layout is the manifest's."""
    path = root / SHARDS_DIR / entry.name
    rel = f"{SHARDS_DIR}/{entry.name}"

    def problem(kind: str, message: str) -> None:
        problems.append(Problem(kind, entry.name, f"{rel}: {message}", fix))

    if not path.is_file():
        problem("missing_shard", f"listed in the manifest ({entry.rows} rows) but missing")
        return False, None, None
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
        return False, None, None

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
        return False, None, None
    try:
        layout = json.loads(meta[META_LAYOUT])
    except (KeyError, ValueError):
        layout = None
    if recipe != cache.recipe or layout != cache.manifest.layout:
        return intact, recipe, layout
    got = pf.schema_arrow.remove_metadata()
    if expected is not None and not got.equals(expected):
        problem(
            "schema_mismatch", f"schema differs from the layout's: {_schema_diff(got, expected)}"
        )
        return False, recipe, layout
    return intact, recipe, layout


def _check_recipes(
    cache: Cache, recipes: dict[str, dict | None], problems: list[Problem], fix: str
) -> bool:
    """Shards whose recipe differs from recipe.toml. If no shard agrees with recipe.toml but
    all agree with each other, recipe.toml is the odd one out: one problem, not N. Returns
    False then (recipe.toml cannot be trusted), else True."""
    readable = {n: r for n, r in recipes.items() if r is not None}
    foreign = {n: r for n, r in readable.items() if r != cache.recipe}
    if not foreign:
        return True

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
        return False
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
    return True


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


# What each row-level kind means, in a problem's message.
_ROW_TEXT = {
    "nonfinite_vectors": "NaN/Inf or null vectors",
    "zero_vectors": "all-zero vectors",
    "unnormalized_vectors": "vectors whose norm is off 1 (the recipe normalises)",
    "bad_scales": "int8 scales <= 0, or vectors off the int8 encoder's grid (largest |q| != 127)",
    "bad_keys": "null or empty keys (embed skips such rows; it never writes them)",
    "bad_token_counts": "negative token counts, or a `truncated` flag that disagrees with them",
}


def _norm_tolerance(dtype: str, dim: int, scale: np.ndarray | None = None) -> np.ndarray | float:
    """Largest |norm - 1| of a normalised vector after storage. int8 rounds each component to
    the grid of step ``scale``: the stored vector is within sqrt(D) * scale / 2 of the true one,
    so its norm is within that of 1 (per row, a proven bound, not a guess)."""
    if dtype == "int8":
        return np.sqrt(dim) * scale / 2 + 1e-4
    return _NORM_TOL[dtype]


class _RowFindings:
    """Bad rows of one shard by kind: how many, in which columns, the first rows and keys."""

    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.columns: dict[str, dict[str, int]] = defaultdict(dict)  # kind -> column -> rows
        self.rows: dict[str, list[int]] = defaultdict(list)
        self.keys: dict[str, list] = defaultdict(list)
        self.worst: dict[str, float] = {}  # unnormalized_vectors: the norm farthest from 1
        self._group: dict[str, np.ndarray] = {}

    def mark(self, kind: str, column: str, bad: np.ndarray) -> None:
        """Rows ``bad`` (a mask over the current row group) have problem ``kind`` in ``column``."""
        if not bad.any():
            return
        cols = self.columns[kind]
        cols[column] = cols.get(column, 0) + int(bad.sum())
        self._group[kind] = self._group[kind] | bad if kind in self._group else bad.copy()

    def end_group(self, offset: int, keys: list) -> None:
        """Count the row group's marks (a row bad in several columns counts once)."""
        for kind, bad in self._group.items():
            idx = np.flatnonzero(bad)
            self.count[kind] += len(idx)
            for i in idx[: _SHOWN - len(self.rows[kind])]:
                self.rows[kind].append(offset + int(i))
                self.keys[kind].append(keys[i])
        self._group = {}

    def problems(self, name: str, fix: str) -> list[Problem]:
        out = []
        for kind in _ROW_TEXT:
            if not self.count.get(kind):
                continue
            cols = ", ".join(f"{c} ({n})" for c, n in self.columns[kind].items())
            worst = f"; farthest norm {self.worst[kind]:.4g}" if kind in self.worst else ""
            message = (
                f"{SHARDS_DIR}/{name}: {self.count[kind]} row(s) with {_ROW_TEXT[kind]}, in "
                f"columns (rows): {cols}{worst}; e.g. rows {self.rows[kind]}, keys {self.keys[kind]}"
            )
            out.append(
                Problem(kind, name, message, fix, columns=list(self.columns[kind]),
                        count=self.count[kind], rows=self.rows[kind], keys=self.keys[kind])
            )  # fmt: skip
        return out


def _vector_values(a: pa.Array, n: int) -> np.ndarray:
    """[n, D] view of a fixed-size-list column's values (null slots included)."""
    d = a.type.list_size
    return a.values.slice(a.offset * d, n * d).to_numpy(zero_copy_only=False).reshape(n, d)


def _scan_rows(
    path: Path, entry: ShardEntry, cache: Cache, problems: list[Problem], fix: str
) -> np.ndarray | None:
    """Every row against what the recipe and layout promise, one column of one row group at a
    time. Returns the 64-bit hashes of the shard's keys (for the duplicate check)."""
    layout, recipe = cache.manifest.layout, cache.recipe
    dtype, dim, names = layout["dtype"], layout["dim"], layout["vector_names"]
    normalize = recipe.get("normalize") is True
    limit = recipe.get("max_caption_tokens")
    token_cols = [TOKENS_PREFIX + c for c in _token_columns(recipe)]
    found = _RowFindings()
    hashes, offset = [], 0
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.metadata.num_row_groups):
            # Column by column: memory holds one column of one row group. (Reading the whole
            # row group at once, for pyarrow's threads, measured no faster on 2 busy cores.)
            def column(name: str, rg: int = rg) -> pa.Array:
                return pf.read_row_group(rg, columns=[name]).column(0).combine_chunks()

            key_col = column("key")
            keys = key_col.to_pylist()
            n = len(keys)
            hashes.append(np.fromiter(map(hash, keys), np.int64, n))
            empty = pc.equal(key_col, "").fill_null(True)
            found.mark("bad_keys", "key", empty.to_numpy(zero_copy_only=False))
            with np.errstate(all="ignore"):  # NaN / Inf rows are reported, not warned about
                for name in names:
                    _check_vectors(found, column, name, n, dtype, dim, normalize)
                if token_cols:
                    _check_tokens(found, column, token_cols, limit)
            found.end_group(offset, keys)
            offset += n
    except (OSError, pa.ArrowException) as e:
        problems.append(
            Problem(
                "unreadable_shard", entry.name, f"{SHARDS_DIR}/{entry.name}: unreadable ({e})", fix
            )
        )
        return None
    problems += found.problems(entry.name, fix)
    return np.concatenate(hashes) if hashes else np.zeros(0, np.int64)


def _check_vectors(found, column, name, n, dtype, dim, normalize) -> None:
    """One vector column of one row group: finite, non-zero, int8 scale and grid, norm.

    One pass computes each row's sum of squares in float32; it is finite exactly when the row
    is (barring float32 overflow) and 0 exactly when the row is zero (barring underflow), so
    only the rows it flags get the exact per-component test."""
    a = column(name)
    v = _vector_values(a, n)
    null = a.is_null().to_numpy(zero_copy_only=False)
    f = v.astype(np.float32, copy=False)
    sq = np.einsum("ij,ij->i", f, f)
    suspect = np.flatnonzero(~np.isfinite(sq))
    nonfinite = np.zeros(n, bool)
    nonfinite[suspect] = ~np.isfinite(f[suspect]).all(axis=1)
    bad = null | nonfinite
    scale = None
    if dtype == "int8":
        scale_name = name + SCALE_SUFFIX
        scale = column(scale_name).to_numpy(zero_copy_only=False).astype(np.float32)  # null: NaN
        found.mark("nonfinite_vectors", name, bad)
        bad_scale = ~np.isfinite(scale)
        found.mark("nonfinite_vectors", scale_name, bad_scale & ~bad)
        bad = bad | bad_scale
    else:
        found.mark("nonfinite_vectors", name, bad)
    zero = np.zeros(n, bool)
    small = np.flatnonzero(~bad & (sq == 0))
    zero[small] = ~(f[small] != 0).any(axis=1)
    found.mark("zero_vectors", name, zero)
    ok = ~bad & ~zero
    if dtype == "int8":
        # The encoder writes q = round(v / s) with s = max|v| / 127: its largest |q| is 127.
        largest = np.maximum(v.max(axis=1).astype(np.int16), -v.min(axis=1).astype(np.int16))
        nonpositive = ok & (scale <= 0)
        off_grid = ok & (largest != 127)
        found.mark("bad_scales", scale_name, nonpositive)
        found.mark("bad_scales", name, off_grid & ~nonpositive)
        ok &= ~nonpositive & ~off_grid
    if normalize and ok.any():
        norm = np.sqrt(sq) if scale is None else np.sqrt(sq) * scale
        off = np.abs(norm - 1)
        off_rows = ok & (off > _norm_tolerance(dtype, dim, scale))
        if off_rows.any():
            found.mark("unnormalized_vectors", name, off_rows)
            worst = float(norm[off_rows][np.argmax(off[off_rows])])
            prev = found.worst.get("unnormalized_vectors")
            if prev is None or abs(worst - 1) > abs(prev - 1):
                found.worst["unnormalized_vectors"] = worst


def _check_tokens(found, column, token_cols, limit) -> None:
    """Token counts are >= 0, and ``truncated`` is set exactly when one exceeds the recipe's
    max_caption_tokens (embed counts a caption's tokens before truncating it)."""
    counts = np.stack(
        [column(c).to_numpy(zero_copy_only=False) for c in token_cols], axis=1
    ).astype(np.int64)
    for j, c in enumerate(token_cols):
        found.mark("bad_token_counts", c, counts[:, j] < 0)
    if isinstance(limit, int) and not isinstance(limit, bool):
        truncated = column("truncated").to_numpy(zero_copy_only=False).astype(bool)
        found.mark("bad_token_counts", "truncated", truncated != (counts > limit).any(axis=1))


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
    rows = defaultdict(list)  # (shard, key) -> its row numbers in the shard
    for name, hs in hashes.items():
        suspect = np.isin(hs, suspects)
        if not suspect.any():
            continue
        keys = pq.read_table(root / SHARDS_DIR / name, columns=["key"]).column(0).to_pylist()
        for i in np.flatnonzero(suspect):
            where[keys[i]].append(name)
            rows[name, keys[i]].append(int(i))
    dups = {k: shards for k, shards in where.items() if len(shards) > 1}
    by_shard = defaultdict(list)
    for k, shards in dups.items():
        for s in dict.fromkeys(shards):
            by_shard[s].append(k)
    for name, keys in sorted(by_shard.items()):
        shown = sorted(r for k in keys for r in rows[name, k])[:_SHOWN]
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
                f"({', '.join(where_txt)}); e.g. rows {shown}",
                fix,
                columns=["key"],
                count=sum(len(rows[name, k]) for k in keys),
                rows=shown,
                keys=keys[:_SHOWN],
            )
        )


# --- stray files ------------------------------------------------------------------------


_pid_alive = pid_alive  # whether a temp file's writer may still be busy


def _temp_pid(name: str) -> int | None:
    """The writer's pid in a temp name: ``.NAME.tmp-PID`` or ``.NAME.tmp-PID-RANDOM``."""
    suffix = name.rsplit(".tmp-", 1)[-1].split("-", 1)[0]
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
    if report.writer:
        lines.append(
            Text(
                f"note: {report.writer} is writing this cache; its unfinished files may show "
                "as temp or orphan files",
                style="yellow",
            )
        )
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
