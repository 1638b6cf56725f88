"""Caption readers: every format yields the rows an independent reader sees, in fixed batches."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store.errors import InputError
from store.tables import (
    FORMATS,
    CaptionBatch,
    CaptionSource,
    available_columns,
    count_rows,
    iter_caption_batches,
    iter_keys,
    resolve_format,
)

# Captions that trip naive readers: separators, quotes, a newline, non-ASCII, leading spaces,
# text that pandas would take for a null, and a missing value.
ROWS = [
    {"key": "000000000", "caption": "A red star.", "long_caption": "A large red star, centred."},
    {"key": "000000001", "caption": 'A "blue" cube', "long_caption": "Line one\nline two"},
    {"key": "000000002", "caption": "  padded  ", "long_caption": None},
    {"key": "000000003", "caption": "NA", "long_caption": "tab\there, comma, here"},
    {"key": "000000004", "caption": "Ünïcödé 星 🌟", "long_caption": "x"},
    {"key": "000000005", "caption": "a, b; c", "long_caption": "'quoted'"},
    {"key": "000000006", "caption": "seven", "long_caption": "seven long"},
]
KEYS = [r["key"] for r in ROWS]


def collect(source: CaptionSource, columns, batch_rows=4096) -> list[CaptionBatch]:
    return list(iter_caption_batches(source, columns, batch_rows=batch_rows))


def flatten(batches: list[CaptionBatch], column: str) -> tuple[list[str], list[str | None]]:
    keys = [k for b in batches for k in b.keys]
    values = [v for b in batches for v in b.columns[column]]
    return keys, values


# --- fixture writers -------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 3) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_delimited(path: Path, rows: list[dict], delimiter: str) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_webdataset(directory: Path, rows: list[dict], per_tar: int = 3) -> Path:
    """img2dataset's webdataset layout: NNNNN.tar with {key}.jpg/.txt/.json per successful
    sample, plus NNNNN.parquet listing every input row (failed ones too) and a stats file."""
    directory.mkdir()
    shards = [rows[i : i + per_tar] for i in range(0, len(rows), per_tar)]
    for n, shard in enumerate(shards):
        with tarfile.open(directory / f"{n:05d}.tar", "w") as tar:
            for row in shard:
                key = row["key"]
                add_member(tar, f"{key}.jpg", b"\xff\xd8\xff\xe0 not really a jpeg " * 50)
                if row["caption"] is not None:
                    add_member(tar, f"{key}.txt", row["caption"].encode())
                meta = {"url": f"http://x/{key}.jpg", "key": key, "status": "success"}
                meta.update({"caption": row["caption"], "long_caption": row["long_caption"]})
                meta["width"] = 64
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        failed = {"key": f"{n:05d}9999", "caption": "failed", "long_caption": None}
        write_parquet(directory / f"{n:05d}.parquet", [*shard, failed])
        (directory / f"{n:05d}_stats.json").write_text("{}")
    return directory


def read_tars_independently(directory: Path) -> list[dict]:
    """Reference reader: whole tars through tarfile's random access, grouped by key."""
    samples: dict[str, dict] = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                sample = samples.setdefault(key, {"key": key})
                data = tar.extractfile(member).read()
                if ext == "txt":
                    sample["txt"] = data.decode()
                elif ext == "json":
                    sample.update({k: v for k, v in json.loads(data).items() if k != "key"})
    return list(samples.values())


# --- every format against an independent reader ----------------------------------------------


def test_parquet_file_matches_pandas_in_exact_batches(tmp_path):
    path = write_parquet(tmp_path / "captions.parquet", ROWS, row_group_size=2)
    batches = collect(CaptionSource(path), ["caption", "long_caption"], batch_rows=3)
    # Row groups hold 2 rows; batches still hold exactly 3 (the last fewer).
    assert [(b.start, len(b.keys)) for b in batches] == [(0, 3), (3, 3), (6, 1)]
    expected = pd.read_parquet(path)
    for column in ("caption", "long_caption"):
        keys, values = flatten(batches, column)
        assert keys == expected["key"].tolist()
        assert values == [None if pd.isna(v) else v for v in expected[column]]
    assert count_rows(CaptionSource(path)) == len(expected)


def test_parquet_directory_reads_files_in_name_order(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    # Written out of order; read in name order, batches crossing the file boundary.
    write_parquet(directory / "part-1.parquet", ROWS[4:])
    write_parquet(directory / "part-0.parquet", ROWS[:4])
    source = CaptionSource(directory)
    assert resolve_format(directory) == "parquet"
    batches = collect(source, ["caption"], batch_rows=5)
    assert [(b.start, len(b.keys)) for b in batches] == [(0, 5), (5, 2)]
    assert flatten(batches, "caption") == (KEYS, [r["caption"] for r in ROWS])
    assert count_rows(source) == len(ROWS)
    assert [k for keys in iter_keys(source, batch_rows=2) for k in keys] == KEYS


def test_parquet_non_string_values_become_str(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": [10, 11, 12], "score": [1.5, None, 3.0]}), path)
    source = CaptionSource(path, key_column="id")
    (batch,) = collect(source, ["score"])
    assert batch.keys == ["10", "11", "12"]
    assert batch.columns == {"score": ["1.5", None, "3.0"]}


def test_img2dataset_parquet_never_reads_the_image_column(tmp_path, monkeypatch):
    directory = tmp_path / "i2d"
    directory.mkdir()
    rows = [
        {**r, "jpg": None if i % 3 == 2 else b"\xff\xd8" * 100, "status": "success"}
        for i, r in enumerate(ROWS)
    ]
    write_parquet(directory / "00000.parquet", rows[:4])
    write_parquet(directory / "00001.parquet", rows[4:])
    (directory / "00000_stats.json").write_text("{}")
    asked: list[list[str]] = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        asked.append(list(kwargs["columns"]))
        return real_iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    source = CaptionSource(directory)
    assert resolve_format(directory) == "parquet"
    assert "jpg" in available_columns(source)
    batches = collect(source, ["caption"], batch_rows=4)
    assert flatten(batches, "caption") == (KEYS, [r["caption"] for r in ROWS])
    assert asked and all("jpg" not in cols for cols in asked)
    assert [k for keys in iter_keys(source) for k in keys] == KEYS
    assert asked[-1] == ["key"]


def test_jsonl_matches_json_module(tmp_path):
    path = tmp_path / "captions.jsonl"
    rows = [dict(r) for r in ROWS]
    del rows[1]["long_caption"]  # a missing field is a missing value
    rows[3]["caption"] = 42  # a non-string scalar becomes str
    write_jsonl(path, rows)
    with open(path, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    batches = collect(CaptionSource(path), ["caption", "long_caption"], batch_rows=2)
    assert [(b.start, len(b.keys)) for b in batches] == [(0, 2), (2, 2), (4, 2), (6, 1)]
    with open(path, encoding="utf-8") as f:
        expected = [json.loads(line) for line in f if line.strip()]
    keys, captions = flatten(batches, "caption")
    assert keys == [r["key"] for r in expected]
    assert captions == [str(r["caption"]) for r in expected]
    assert flatten(batches, "long_caption")[1] == [r.get("long_caption") for r in expected]
    assert count_rows(CaptionSource(path)) is None


def test_jsonl_gzip_and_json_extension(tmp_path):
    plain = write_jsonl(tmp_path / "captions.json", ROWS)
    packed = tmp_path / "captions.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, packed):
        assert resolve_format(path) == "jsonl"
        batches = collect(CaptionSource(path), ["caption"])
        assert flatten(batches, "caption") == (KEYS, [r["caption"] for r in ROWS])


@pytest.mark.parametrize("fmt,delimiter", [("csv", ","), ("tsv", "\t")])
def test_delimited_matches_csv_module(tmp_path, fmt, delimiter):
    path = write_delimited(tmp_path / f"captions.{fmt}", ROWS, delimiter)
    assert resolve_format(path) == fmt
    batches = collect(CaptionSource(path), ["long_caption", "caption"], batch_rows=4)
    assert [(b.start, len(b.keys)) for b in batches] == [(0, 4), (4, 3)]
    with open(path, encoding="utf-8", newline="") as f:
        expected = list(csv.DictReader(f, delimiter=delimiter))
    for column in ("caption", "long_caption"):
        keys, values = flatten(batches, column)
        assert keys == [r["key"] for r in expected]
        # An empty cell is a missing value; "NA" and leading zeros in keys are kept as text.
        assert values == [r[column] or None for r in expected]
    assert [k for keys in iter_keys(CaptionSource(path)) for k in keys] == KEYS


def test_webdataset_matches_tarfile_and_is_preferred_over_its_parquet(tmp_path):
    present = [r for r in ROWS if r["key"] != "000000002"]  # a failed sample: absent from tars
    directory = write_img2dataset_webdataset(tmp_path / "wds", present)
    source = CaptionSource(directory)
    assert resolve_format(directory) == "webdataset"
    columns = available_columns(source)
    assert columns[:2] == ["key", "txt"]
    assert {"url", "caption", "long_caption", "status", "width"} <= set(columns)

    batches = collect(source, ["txt", "long_caption", "width"], batch_rows=4)
    assert [(b.start, len(b.keys)) for b in batches] == [(0, 4), (4, 2)]
    expected = read_tars_independently(directory)
    assert [b_key for b in batches for b_key in b.keys] == [s["key"] for s in expected]
    assert flatten(batches, "txt")[1] == [s["txt"] for s in expected]
    assert flatten(batches, "long_caption")[1] == [s["long_caption"] for s in expected]
    assert flatten(batches, "width")[1] == ["64"] * len(expected)
    assert [k for keys in iter_keys(source) for k in keys] == [s["key"] for s in expected]
    assert count_rows(source) is None

    # Forcing parquet reads img2dataset's metadata instead: every input row, failed ones too.
    forced = CaptionSource(directory, format="parquet")
    assert count_rows(forced) == len(present) + 2
    assert len([k for keys in iter_keys(forced) for k in keys]) == len(present) + 2


def test_webdataset_key_from_member_name_and_missing_txt(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.jpg", b"img")
        add_member(tar, "a.txt", b"first")
        add_member(tar, "b.jpg", b"img")  # no text at all: a sample with no caption
        add_member(tar, "c.txt", b"third")
        add_member(tar, "c.json", b'{"caption": "json caption", "key": null}')
    (batch,) = collect(CaptionSource(path), ["txt", "caption"])
    assert batch.keys == ["a", "b", "c"]
    assert batch.columns == {
        "txt": ["first", None, "third"],
        "caption": [None, None, "json caption"],
    }


def test_column_selection(tmp_path):
    path = write_parquet(tmp_path / "captions.parquet", ROWS)
    (batch,) = collect(CaptionSource(path), ["long_caption", "long_caption"])
    assert list(batch.columns) == ["long_caption"]
    (batch,) = collect(CaptionSource(path), ["key"])  # the key may also be embedded
    assert batch.columns == {"key": KEYS}
    (batch,) = collect(CaptionSource(path, key_column="caption"), ["long_caption"])
    assert batch.keys == [r["caption"] for r in ROWS]


# --- errors a user can cause ---------------------------------------------------------------


def make_input(tmp_path: Path, fmt: str) -> Path:
    if fmt == "parquet":
        return write_parquet(tmp_path / "captions.parquet", ROWS)
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "captions.jsonl", ROWS)
    if fmt in ("csv", "tsv"):
        return write_delimited(tmp_path / f"captions.{fmt}", ROWS, "," if fmt == "csv" else "\t")
    return write_img2dataset_webdataset(tmp_path / "wds", ROWS)


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_missing_columns_are_named_with_the_columns_found(tmp_path, fmt):
    path = make_input(tmp_path, fmt)
    with pytest.raises(InputError) as err:
        collect(CaptionSource(path), ["caption", "summary"])
    message = str(err.value)
    assert "column 'summary' not found in" in message
    assert path.name in message
    assert "columns found: key" in message and "caption" in message
    with pytest.raises(InputError, match="'id'"):
        collect(CaptionSource(path, key_column="id"), ["caption"])
    with pytest.raises(InputError, match="columns 'a', 'b' not found"):
        collect(CaptionSource(path), ["a", "b"])


def test_missing_column_message_example(tmp_path):
    path = write_parquet(tmp_path / "captions.parquet", [{"key": "a", "caption": "x", "text": "y"}])
    with pytest.raises(InputError) as err:
        collect(CaptionSource(path), ["long_caption"])
    assert str(err.value).endswith(
        "column 'long_caption' not found in " + str(path) + "; columns found: key, caption, text"
    )


def test_invalid_utf8_in_csv_names_file_and_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"key,caption\na,fine\nb,caf\xe9\nc,fine\n")
    with pytest.raises(InputError, match=r"bad\.csv: row 2 .*caption.*not valid UTF-8"):
        collect(CaptionSource(path), ["caption"])


def test_invalid_utf8_in_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"key": "a", "caption": "x"}\n\n{"key": "b", "caption": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 3 is not valid UTF-8"):
        collect(CaptionSource(path), ["caption"])


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"key": "a", "caption": "x"}\n{"key": "b", "caption": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        collect(CaptionSource(path), ["caption"])
    array = tmp_path / "array.json"
    array.write_text('[\n{"key": "a"}\n]\n')
    with pytest.raises(InputError, match="one object per line"):
        collect(CaptionSource(array), [])


def test_invalid_utf8_in_txt_member_names_tar_and_member(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "0001.txt", b"fine")
        add_member(tar, "0002.txt", b"caf\xe9")
    with pytest.raises(InputError, match=r"00000\.tar: member 0002\.txt is not valid UTF-8"):
        collect(CaptionSource(path), ["txt"])


def test_null_key_is_refused_with_its_row(tmp_path):
    path = tmp_path / "keys.csv"
    path.write_text("key,caption\na,x\n,y\n")
    with pytest.raises(InputError, match=r"keys\.csv: row 2 has no key"):
        collect(CaptionSource(path), ["caption"])
    path = tmp_path / "keys.jsonl"
    path.write_text('{"key": "a", "caption": "x"}\n{"caption": "y"}\n')
    with pytest.raises(InputError, match=r"keys\.jsonl: line 2 has no key"):
        collect(CaptionSource(path), ["caption"])


def test_paths_and_formats_that_cannot_be_used(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_format(tmp_path / "nope.parquet")
    with pytest.raises(InputError, match="does not exist"):
        collect(CaptionSource(tmp_path / "nope.parquet"), ["caption"])
    odd = tmp_path / "captions.xlsx"
    odd.write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        resolve_format(odd)
    assert resolve_format(odd, "csv") == "csv"  # a forced format is taken as given
    with pytest.raises(InputError, match="unknown caption format 'xml'"):
        resolve_format(odd, "xml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no caption files"):
        resolve_format(empty)
    with pytest.raises(InputError, match="no parquet files"):
        collect(CaptionSource(empty, format="parquet"), ["caption"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", ROWS)
    write_delimited(mixed / "b.csv", ROWS, ",")
    with pytest.raises(InputError, match=r"mixes caption formats \(csv, jsonl\)"):
        resolve_format(mixed)
    assert resolve_format(mixed, "jsonl") == "jsonl"
    assert len(collect(CaptionSource(mixed, format="jsonl"), ["caption"])[0].keys) == len(ROWS)


def test_empty_inputs_yield_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("key,caption\n")
    pq.write_table(
        pa.table({"key": pa.array([], pa.string()), "caption": []}), tmp_path / "e.parquet"
    )
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    for name in ("empty.jsonl", "empty.csv", "header.csv", "e.parquet", "empty.tar"):
        source = CaptionSource(tmp_path / name)
        assert collect(source, ["caption"]) == [], name
        assert list(iter_keys(source)) == [], name
    assert count_rows(CaptionSource(tmp_path / "e.parquet")) == 0
    assert available_columns(CaptionSource(tmp_path / "empty.jsonl")) == []
    assert available_columns(CaptionSource(tmp_path / "header.csv")) == ["key", "caption"]


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_available_columns(tmp_path, fmt):
    columns = available_columns(CaptionSource(make_input(tmp_path, fmt)))
    assert {"key", "caption", "long_caption"} <= set(columns)


def test_batch_rows_of_one_and_exact_multiple(tmp_path):
    path = write_jsonl(tmp_path / "captions.jsonl", ROWS)
    batches = collect(CaptionSource(path), ["caption"], batch_rows=1)
    assert [b.start for b in batches] == list(range(len(ROWS)))
    batches = collect(CaptionSource(path), ["caption"], batch_rows=len(ROWS))
    assert [(b.start, len(b.keys)) for b in batches] == [(0, len(ROWS))]
    with pytest.raises(ValueError):
        collect(CaptionSource(path), ["caption"], batch_rows=0)
