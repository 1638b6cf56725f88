"""The synthetic dataset, read back the way img2dataset consumers and our eval loaders read it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.synth import (
    FACET_NAMES,
    SynthConfig,
    held_out_combos,
    iter_samples,
    make_sample,
    vocabulary,
    write_synth,
)
from store.errors import InputError

# Small but with several shards, failures and every eval split.
SMALL = dict(n=250, shard_size=100, fail_fraction=0.06, n_retrieval=20, n_zeroshot_per_class=2)
SIZE = 64


def _cfg(fmt: str, seed: int = 0, **kw) -> SynthConfig:
    return SynthConfig(**{"format": fmt, "seed": seed, "image_size": SIZE, **SMALL, **kw})


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """One dataset per format: {format: (OUT, summary)}."""
    out = {}
    for fmt in ("webdataset", "parquet"):
        path = tmp_path_factory.mktemp(fmt)
        out[fmt] = (path, write_synth(path, _cfg(fmt), progress=False))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text.lower()) is not None


def _labels(root: Path) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(root / "labels.parquet").to_pylist()}


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_same_seed_gives_identical_bytes(fmt, written, tmp_path):
    first, _ = written[fmt]
    write_synth(tmp_path, _cfg(fmt), progress=False)
    a, b = _files(first), _files(tmp_path)
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []


def test_different_seed_gives_different_data(written, tmp_path):
    first, _ = written["webdataset"]
    write_synth(tmp_path, _cfg("webdataset", seed=1), progress=False)
    for name in ("captions.parquet", "labels.parquet", "images/00000.tar"):
        assert (first / name).read_bytes() != (tmp_path / name).read_bytes(), name


def test_sample_is_a_pure_function_of_seed_and_index():
    a = make_sample(3, 17)
    b = list(iter_samples(3, seed=3, start=16, render=True))[1]
    assert (a.key, a.caption, a.long_caption, a.answers) == (
        b.key,
        b.caption,
        b.long_caption,
        b.answers,
    )
    assert a.image.tobytes() == b.image.tobytes()
    assert a.key == "000000017"
    assert make_sample(3, 18).long_caption != a.long_caption
    assert make_sample(3, 17, render=False).image is None


# ---------------------------------------------------------------------------------------------
# img2dataset layouts


def test_webdataset_reads_back_like_img2dataset(written):
    root, summary = written["webdataset"]
    labels = _labels(root)
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    tars = sorted((root / "images").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    for path in tars:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members[key][ext] = tar.extractfile(m).read()
    failed = {k for k, row in labels.items() if row["split"] == "train" and row["failed"]}
    train = {k for k, row in labels.items() if row["split"] == "train"}
    assert failed and summary.n_failed == len(failed)
    assert set(members) == train - failed  # failed downloads are absent from the tars
    for key, files in members.items():
        assert re.fullmatch(r"\d{9}", key)
        assert set(files) == {"jpg", "txt", "json"}
        meta = json.loads(files["json"])
        assert meta["key"] == key and meta["status"] == "success"
        assert meta["caption"] == files["txt"].decode()
        assert (meta["width"], meta["height"]) == (SIZE, SIZE)
        assert meta["long_caption"] and meta["short_caption"]
        image = Image.open(io.BytesIO(files["jpg"]))
        assert image.format == "JPEG" and image.size == (SIZE, SIZE)
    # Per-shard metadata parquet and stats list every sample, failed ones included.
    meta = pq.read_table(root / "images" / "00001.parquet").to_pylist()
    assert [m["key"] for m in meta] == [f"{10000 + i:09d}" for i in range(100)]
    n_failed = sum(m["status"] == "failed_to_download" for m in meta)
    stats = json.loads((root / "images" / "00001_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (
        100,
        100 - n_failed,
        n_failed,
    )


def test_parquet_reads_back_like_img2dataset(written):
    root, summary = written["parquet"]
    shards = sorted((root / "images").glob("*.parquet"))
    assert [s.name for s in shards] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    rows = [row for s in shards for row in pq.read_table(s).to_pylist()]
    for column in (
        "key",
        "jpg",
        "txt",
        "status",
        "width",
        "height",
        "short_caption",
        "long_caption",
    ):
        assert column in rows[0], column
    assert len(rows) == summary.counts["train"] == 250
    failed = [r for r in rows if r["status"] == "failed_to_download"]
    assert len(failed) == summary.n_failed > 0
    assert all(r["jpg"] is None for r in failed)
    for r in rows:
        if r["status"] == "success":
            assert (
                Image.open(io.BytesIO(r["jpg"])).size == (SIZE, SIZE) == (r["width"], r["height"])
            )
    assert not list((root / "images").glob("*.tar"))


def test_captions_parquet_has_every_train_row(written):
    root, summary = written["webdataset"]
    table = pq.read_table(root / "captions.parquet")
    assert table.column_names == ["key", "caption", "short_caption", "long_caption"]
    assert all(str(t) == "string" for t in table.schema.types)
    labels = _labels(root)
    train = [k for k, row in labels.items() if row["split"] == "train"]
    assert table.column("key").to_pylist() == train  # failed samples included, in key order
    assert len(train) == summary.counts["train"]


# ---------------------------------------------------------------------------------------------
# Captions and answers


def test_every_caption_names_main_shape_and_colour(written):
    root, _ = written["webdataset"]
    labels = _labels(root)
    tables = [
        pq.read_table(root / "captions.parquet"),
        pq.read_table(root / "eval" / "retrieval" / "captions.parquet"),
    ]
    n = 0
    for table in tables:
        for row in table.to_pylist():
            truth = labels[row["key"]]
            for kind in ("caption", "short_caption", "long_caption"):
                assert _has_word(row[kind], truth["main_shape"]), (
                    kind,
                    row[kind],
                    truth["main_shape"],
                )
                assert _has_word(row[kind], truth["main_color"]), (
                    kind,
                    row[kind],
                    truth["main_color"],
                )
            n += 1
    assert n == 250 + 20


def test_answers_are_one_vocabulary_word_and_named_in_long_caption():
    vocab = vocabulary()
    for s in iter_samples(400, seed=5):
        assert tuple(s.answers) == FACET_NAMES
        for facet, word in s.answers.items():
            assert re.fullmatch(r"[a-z]+", word) and word in vocab[facet], (facet, word)
            assert _has_word(s.long_caption, word), (facet, word, s.long_caption)
        assert s.answers["description"] == s.answers["main_object"] == s.attributes["main_shape"]
        assert s.answers["main_characteristic"] == s.attributes["main_color"]
        assert s.answers["atmosphere"] == s.attributes["mood"]
        if s.attributes["n_objects"] == "1":
            assert s.answers["minor_object"] == s.answers["minor_characteristic"] == "nothing"


def test_captions_name_no_colour_shape_or_mood_absent_from_the_image():
    vocab = vocabulary()
    for s in iter_samples(400, seed=6):
        a = s.attributes
        present = {
            "colors": {a["main_color"], a["minor_color"], a["extra_color"]},
            "shapes": {a["main_shape"], a["minor_shape"], a["extra_shape"]},
            "moods": {a["mood"]},
        }
        for text in (s.caption, s.short_caption, s.long_caption):
            words = set(re.findall(r"[a-z]+", text.lower()))
            for kind, allowed in present.items():
                assert not (words & set(vocab[kind])) - allowed, (kind, text)


def test_long_captions_have_3_to_6_sentences_and_varied_length():
    counts, lengths, openings = set(), [], set()
    for s in iter_samples(400, seed=7):
        sentences = re.split(r"(?<=[.!?])\s+", s.long_caption.strip())
        counts.add(len(sentences))
        lengths.append(len(s.long_caption.split()))
        openings.add(" ".join(sentences[0].split()[:2]))
        assert len(re.split(r"(?<=[.!?])\s+", s.short_caption.strip())) == 1
    assert counts == {3, 4, 5, 6}
    # ~80-250 tokens; words are roughly 0.75 tokens each.
    assert min(lengths) >= 55 and max(lengths) <= 195
    assert max(lengths) - min(lengths) >= 60
    assert len(openings) >= 6  # phrasing and sentence order vary


# ---------------------------------------------------------------------------------------------
# Eval splits


def test_eval_splits_are_disjoint_from_training(written):
    root, summary = written["webdataset"]
    labels = _labels(root)
    by_split = defaultdict(set)
    for key, row in labels.items():
        by_split[row["split"]].add(key)
    assert {s: len(k) for s, k in by_split.items()} == summary.counts
    assert sum(map(len, by_split.values())) == len(labels)  # keys unique across splits

    train_images = set()
    for path in (root / "images").glob("*.tar"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    train_images.add(hashlib.sha256(tar.extractfile(m).read()).hexdigest())
    eval_images = [p for p in (root / "eval").rglob("*.jpg")]
    assert len(eval_images) == sum(summary.counts.values()) - summary.counts["train"]
    for path in eval_images:
        assert path.stem not in by_split["train"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in train_images


def test_unseen_combos_are_never_a_training_main_object(written):
    root, summary = written["webdataset"]
    held = held_out_combos(0)
    assert summary.held_out == [f"{c} {s}" for c, s in held]
    assert len(held) == 8 and len({c for c, _ in held}) == len({s for _, s in held}) == 8
    labels = _labels(root).values()
    train_mains = {
        (r["main_color"], r["main_shape"]) for r in labels if r["split"] in ("train", "retrieval")
    }
    assert not train_mains & set(held)
    # Over many more samples than were written, too.
    assert not {
        (s.attributes["main_color"], s.attributes["main_shape"]) for s in iter_samples(3000)
    } & set(held)
    assert held_out_combos(1) != held


@pytest.mark.parametrize(
    ("split", "fields"),
    [
        ("zeroshot_shape", ("main_shape",)),
        ("zeroshot_color_shape", ("main_color", "main_shape")),
        ("unseen", ("main_color", "main_shape")),
    ],
)
def test_class_folders_match_classes_txt_and_labels(written, split, fields):
    root, _ = written["webdataset"]
    labels = _labels(root)
    folder = root / "eval" / split
    classes = (folder / "classes.txt").read_text().splitlines()
    dirs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert [c.replace(" ", "_") for c in classes] == dirs  # ImageFolder label order
    for name, text in zip(dirs, classes, strict=True):
        images = sorted((folder / name).glob("*.jpg"))
        assert len(images) == SMALL["n_zeroshot_per_class"]
        for path in images:
            row = labels[path.stem]
            assert row["split"] == split
            assert " ".join(row[f] for f in fields) == text
            assert Image.open(path).size == (SIZE, SIZE)
    if split == "unseen":
        assert classes == [f"{c} {s}" for c, s in held_out_combos(0)]


def test_retrieval_split_layout(written):
    root, _ = written["parquet"]
    table = pq.read_table(root / "eval" / "retrieval" / "captions.parquet")
    assert table.column_names == ["key", "image", "caption", "short_caption", "long_caption"]
    for row in table.to_pylist():
        path = root / "eval" / "retrieval" / row["image"]
        assert path.name == f"{row['key']}.jpg" and Image.open(path).size == (SIZE, SIZE)


def test_dataset_json_describes_the_dataset(written):
    root, summary = written["parquet"]
    info = json.loads((root / "dataset.json").read_text())
    assert info["seed"] == 0 and info["format"] == "parquet" and info["image_size"] == SIZE
    assert info["counts"] == summary.counts and info["n_failed"] == summary.n_failed
    assert info["held_out_combos"] == summary.held_out
    assert (root / "README.txt").read_text().startswith("facetclip synthetic")


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(n=0), "1..10_000_000"),
        (dict(n=10_000_001), "1..10_000_000"),
        (dict(image_size=8), "16..1024"),
        (dict(image_size=2048), "16..1024"),
        (dict(format="zip"), "webdataset, parquet"),
        (dict(shard_size=20_000), "1..10000"),
        (dict(fail_fraction=1.0), "[0, 1)"),
    ],
)
def test_bad_config_is_refused(tmp_path, change, message):
    with pytest.raises(InputError, match=re.escape(message)):
        write_synth(tmp_path / "out", _cfg("webdataset", **change), progress=False)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite"):
        write_synth(
            tmp_path, _cfg("parquet", n=5, n_retrieval=1, n_zeroshot_per_class=0), progress=False
        )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "stale.tar").write_bytes(b"old")
    cfg = _cfg("parquet", n=5, n_retrieval=1, n_zeroshot_per_class=0, overwrite=True)
    summary = write_synth(tmp_path, cfg, progress=False)
    assert summary.counts["train"] == 5
    assert not (tmp_path / "images" / "stale.tar").exists()  # previous outputs are replaced
    assert (tmp_path / "notes.txt").read_text() == "mine"  # unrelated files are kept
