"""Benchmark loaders: a tiny fixture in each public layout, written by hand, is read back exactly;
a broken copy of each fails with an InputError naming the file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.benchmarks import (
    LAYOUTS,
    ClassificationSet,
    RetrievalSet,
    load_benchmark,
)
from eval.synth import SynthConfig, write_synth
from store.errors import InputError


def _image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def _pairs(s: RetrievalSet) -> list[tuple[str, str]]:
    """(image file name, caption) per caption: the mapping a retrieval metric relies on."""
    return [(s.images[i].name, c) for c, i in zip(s.captions, s.caption_image, strict=True)]


def _assert_well_formed(s: RetrievalSet) -> None:
    assert len(s.captions) == len(s.caption_image)
    assert all(p.is_file() for p in s.images)
    assert sorted(set(s.caption_image)) == list(range(len(s.images)))  # no image without text


# --- imagefolder -----------------------------------------------------------------------------


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    root = tmp_path / "shapes"
    for folder, n in (("red_star", 3), ("blue_circle", 2), ("green_heart", 1)):
        for k in range(n):
            _image(root / folder / f"{k:03d}.{'png' if k % 2 else 'jpg'}")
    (root / "red_star" / "notes.txt").write_text("not an image")
    _image(root / "red_star" / ".hidden.jpg")
    _image(root / "blue_circle" / "nested" / "deep.JPEG")  # recursive, any-case suffix
    (root / ".cache").mkdir()
    # sorted folder order: blue_circle, green_heart, red_star
    (root / "classes.txt").write_text("blue ball\ngreen heart\nred star\n")
    return root


def test_imagefolder_reads_classes_txt_in_sorted_folder_order(imagefolder):
    s = load_benchmark("imagefolder", imagefolder)
    assert isinstance(s, ClassificationSet)
    assert s.name == "shapes"
    assert s.classes == ["blue ball", "green heart", "red star"]
    got = sorted(
        (s.classes[label], p.relative_to(imagefolder).as_posix())
        for p, label in zip(s.images, s.labels, strict=True)
    )
    assert got == [
        ("blue ball", "blue_circle/000.jpg"),
        ("blue ball", "blue_circle/001.png"),
        ("blue ball", "blue_circle/nested/deep.JPEG"),
        ("green heart", "green_heart/000.jpg"),
        ("red star", "red_star/000.jpg"),
        ("red star", "red_star/001.png"),
        ("red star", "red_star/002.jpg"),
    ]


def test_imagefolder_without_classes_txt_uses_folder_names(imagefolder):
    (imagefolder / "classes.txt").unlink()
    s = load_benchmark("imagefolder", imagefolder)
    assert s.classes == ["blue circle", "green heart", "red star"]


def test_imagefolder_limit_takes_classes_in_turn(imagefolder):
    s = load_benchmark("imagefolder", imagefolder, limit=4)
    assert s.labels == [0, 1, 2, 0]  # every class before any class's second image
    assert [p.name for p in s.images] == ["000.jpg", "000.jpg", "000.jpg", "001.png"]
    assert s.classes == ["blue ball", "green heart", "red star"]  # all classes stay candidates


def test_imagefolder_errors(imagefolder, tmp_path):
    (imagefolder / "classes.txt").write_text("only one\n")
    with pytest.raises(InputError, match=r"classes\.txt names 1 classes but there are 3"):
        load_benchmark("imagefolder", imagefolder)
    (imagefolder / "classes.txt").unlink()
    (imagefolder / "empty_class").mkdir()
    with pytest.raises(InputError, match="empty_class/ holds no images"):
        load_benchmark("imagefolder", imagefolder)
    with pytest.raises(InputError, match="no class folders"):
        load_benchmark("imagefolder", tmp_path / "shapes" / "red_star")
    with pytest.raises(InputError, match="has no splits"):
        load_benchmark("imagefolder", imagefolder, split="val")


# --- karpathy --------------------------------------------------------------------------------


def _sentences(*raws: str) -> list[dict]:
    return [
        {"raw": r, "tokens": r.lower().split(), "imgid": 0, "sentid": i} for i, r in enumerate(raws)
    ]


@pytest.fixture
def coco(tmp_path) -> Path:
    root = tmp_path / "coco"
    images = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test",
         "sentences": _sentences("A dog on a sofa.", "A brown dog.", "Dog resting.", "A pet.", "Sofa dog.")},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "split": "train",
         "sentences": _sentences("A cat.")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000073.jpg", "split": "test",
         "sentences": _sentences("Two bikes. ", "Bikes by a wall.", "Red bikes.", "Bicycles.", "Parked bikes.", "Six of them.")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000074.jpg", "split": "restval",
         "sentences": _sentences("A kite.")},
    ]  # fmt: skip
    for record in images:
        _image(root / record["filepath"] / record["filename"])
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def test_karpathy_coco_test_split_keeps_every_sentence(coco):
    s = load_benchmark("karpathy", coco)
    assert isinstance(s, RetrievalSet) and s.name == "coco-test"
    _assert_well_formed(s)
    assert [p.relative_to(coco).as_posix() for p in s.images] == [
        "val2014/COCO_val2014_000000000042.jpg",
        "val2014/COCO_val2014_000000000073.jpg",
    ]
    assert s.caption_image == [0] * 5 + [1] * 6
    assert s.captions[5] == "Two bikes."  # stripped
    assert s.caption_language is None
    restval = load_benchmark("karpathy", coco / "dataset_coco.json", split="restval")
    assert _pairs(restval) == [("COCO_val2014_000000000074.jpg", "A kite.")]
    assert len(load_benchmark("karpathy", coco, split="all").images) == 4
    assert load_benchmark("karpathy", coco, limit=1).caption_image == [0] * 5


@pytest.mark.parametrize("image_dir", ["flickr30k-images", "images"])
def test_karpathy_flickr_finds_its_image_folder(tmp_path, image_dir):
    root = tmp_path / "flickr30k"
    records = [
        {
            "filename": f"{n}.jpg",
            "split": split,
            "sentences": _sentences(f"photo {n} a", f"photo {n} b"),
        }
        for n, split in ((1000092795, "test"), (10002456, "val"), (1001773457, "test"))
    ]
    for r in records:
        _image(root / image_dir / r["filename"])
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": records}))
    s = load_benchmark("karpathy", root)
    assert s.name == "flickr30k-test"
    assert [p.parent.name for p in s.images] == [image_dir, image_dir]
    assert _pairs(s) == [
        ("1000092795.jpg", "photo 1000092795 a"),
        ("1000092795.jpg", "photo 1000092795 b"),
        ("1001773457.jpg", "photo 1001773457 a"),
        ("1001773457.jpg", "photo 1001773457 b"),
    ]


def test_karpathy_errors(coco):
    (coco / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(
        InputError, match=r"val2014/COCO_val2014_000000000073\.jpg not found.*images\[2\]"
    ):
        load_benchmark("karpathy", coco)
    with pytest.raises(
        InputError, match=r"no images in split 'dev'; splits present: test, train, restval"
    ):
        load_benchmark("karpathy", coco, split="dev")
    shutil.rmtree(coco / "val2014")
    with pytest.raises(
        InputError, match=r"COCO_val2014_000000000042\.jpg .*not found; tried .*flickr30k-images"
    ):
        load_benchmark("karpathy", coco)
    (coco / "dataset_coco.json").write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(InputError, match=r"dataset_coco\.json is not valid JSON .*line 2"):
        load_benchmark("karpathy", coco)
    (coco / "dataset_coco.json").write_text(
        json.dumps({"images": [{"split": "test", "sentences": []}]})
    )
    with pytest.raises(InputError, match=r"images\[0\] needs a non-empty str 'filename'"):
        load_benchmark("karpathy", coco)


# --- urban1k ---------------------------------------------------------------------------------


@pytest.fixture
def urban1k(tmp_path) -> Path:
    root = tmp_path / "data" / "Urban1k"  # Urban1k.zip unpacks into Urban1k/
    for n in (1, 2, 10):
        _image(root / "image" / f"{n}.jpg")
        (root / "caption").mkdir(exist_ok=True)
        (root / "caption" / f"{n}.txt").write_text(f"A long city street caption number {n}.\n")
    return root


def test_urban1k_pairs_by_name_in_numeric_order(urban1k):
    s = load_benchmark("urban1k", urban1k)
    assert s.name == "urban1k"
    _assert_well_formed(s)
    assert _pairs(s) == [
        ("1.jpg", "A long city street caption number 1."),
        ("2.jpg", "A long city street caption number 2."),
        ("10.jpg", "A long city street caption number 10."),
    ]
    assert load_benchmark("urban1k", urban1k.parent).images == s.images  # parent of Urban1k/
    assert len(load_benchmark("urban1k", urban1k, limit=2).images) == 2


def test_urban1k_errors(urban1k):
    (urban1k / "image" / "2.jpg").unlink()
    with pytest.raises(InputError, match=r"caption/2\.txt has no matching image image/2\.jpg"):
        load_benchmark("urban1k", urban1k)
    _image(urban1k / "image" / "2.jpg")
    (urban1k / "caption" / "10.txt").unlink()
    with pytest.raises(InputError, match=r"image/10\.jpg has no matching caption caption/10\.txt"):
        load_benchmark("urban1k", urban1k)
    (urban1k / "caption" / "10.txt").write_text("\n")
    with pytest.raises(InputError, match=r"caption/10\.txt is empty"):
        load_benchmark("urban1k", urban1k)
    shutil.rmtree(urban1k / "caption")
    with pytest.raises(InputError, match=r"caption/ not found"):
        load_benchmark("urban1k", urban1k)


# --- dci -------------------------------------------------------------------------------------


@pytest.fixture
def dci(tmp_path) -> Path:
    root = tmp_path / "DCI"
    base = root / "densely_captioned_images"
    splits = {"train": ["sa_1.json"], "valid": ["sa_2.json"], "test": ["sa_3.json", "sa_4.json"]}
    (base / "annotations").mkdir(parents=True)
    for n in range(1, 5):
        _image(base / "photos" / f"sa_{n}.jpg")
        anno = {
            "image": f"sa_{n}.jpg",
            "short_caption": f"A photo of scene {n}.",
            "extra_caption": "There is a tree. The sky is blue.\nA car is parked.",
            "mask_data": {},
            "mask_keys": [],
        }
        (base / "annotations" / f"sa_{n}.json").write_text(json.dumps(anno))
    (base / "splits.json").write_text(json.dumps(splits))
    return root


def test_dci_reads_splits_and_joins_captions_like_flame(dci):
    s = load_benchmark("dci", dci)
    assert s.name == "dci-test"
    _assert_well_formed(s)
    assert [p.name for p in s.images] == ["sa_3.jpg", "sa_4.jpg"]
    assert s.captions[0] == (
        "A photo of scene 3. There is a tree. The sky is blue. A car is parked"
    )
    everything = load_benchmark("dci", dci / "densely_captioned_images", split="all")
    assert [p.name for p in everything.images] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg", "sa_4.jpg"]
    assert [p.name for p in load_benchmark("dci", dci, split="val").images] == ["sa_2.jpg"]
    assert len(load_benchmark("dci", dci, split="all", limit=3).images) == 3


def test_dci_errors(dci):
    base = dci / "densely_captioned_images"
    (base / "photos" / "sa_4.jpg").unlink()
    with pytest.raises(
        InputError, match=r"photos/sa_4\.jpg not found \(named by annotations/sa_4\.json\)"
    ):
        load_benchmark("dci", dci)
    (base / "annotations" / "sa_3.json").write_text('{"image": "sa_3.jpg",\n "short_caption": }')
    with pytest.raises(InputError, match=r"annotations/sa_3\.json is not valid JSON .*line 2"):
        load_benchmark("dci", dci)
    (base / "annotations" / "sa_3.json").unlink()
    with pytest.raises(InputError, match=r"annotations/sa_3\.json not found"):
        load_benchmark("dci", dci)
    with pytest.raises(
        InputError, match=r"no images in split 'dev'; splits present: train, valid, test"
    ):
        load_benchmark("dci", dci, split="dev")
    (base / "splits.json").unlink()
    with pytest.raises(InputError, match=r"splits\.json not found"):
        load_benchmark("dci", dci)


# --- docci -----------------------------------------------------------------------------------


@pytest.fixture
def docci(tmp_path) -> Path:
    root = tmp_path / "docci"
    records = []
    for example_id, split in (("train_00001", "train"), ("test_00001", "test"),
                              ("qual_dev_00001", "qual_dev"), ("test_00002", "test")):  # fmt: skip
        _image(root / "images" / f"{example_id}.jpg")
        records.append(
            {
                "example_id": example_id,
                "split": split,
                "image_file": f"{example_id}.jpg",
                "description": f"A detailed view of {example_id}.\nIn the background, a wall.",
            }
        )
    _write_jsonl(root / "docci_descriptions.jsonlines", records)
    return root


def test_docci_test_split(docci):
    s = load_benchmark("docci", docci)
    assert s.name == "docci-test"
    _assert_well_formed(s)
    assert _pairs(s) == [
        ("test_00001.jpg", "A detailed view of test_00001. In the background, a wall."),
        ("test_00002.jpg", "A detailed view of test_00002. In the background, a wall."),
    ]
    assert [p.name for p in load_benchmark("docci", docci, split="qual_dev").images] == [
        "qual_dev_00001.jpg"
    ]
    assert len(load_benchmark("docci", docci, split="all").images) == 4


def test_docci_errors(docci):
    file = docci / "docci_descriptions.jsonlines"
    lines = file.read_text().splitlines()
    (docci / "images" / "test_00002.jpg").unlink()
    with pytest.raises(
        InputError,
        match=r"images/test_00002\.jpg not found \(named by docci_descriptions\.jsonlines line 4\)",
    ):
        load_benchmark("docci", docci)
    file.write_text(lines[0] + "\n" + lines[1][:-3] + "\n")
    with pytest.raises(
        InputError, match=r"docci_descriptions\.jsonlines: line 2 is not valid JSON"
    ):
        load_benchmark("docci", docci)
    record = json.loads(lines[1])
    del record["description"]
    _write_jsonl(file, [record])
    with pytest.raises(InputError, match=r"line 1 needs a non-empty str 'description' \(missing\)"):
        load_benchmark("docci", docci)
    with pytest.raises(InputError, match=r"no images in split 'val'; splits present: test"):
        load_benchmark("docci", docci, split="val")


# --- xm3600 ----------------------------------------------------------------------------------

_XM = {
    "en": ["A red bus.", "A bus on the road."],
    "de": ["Ein roter Bus."],
    "zh": ["一辆红色的公共汽车。", "路上的公共汽车。"],
}


@pytest.fixture
def xm3600(tmp_path) -> Path:
    root = tmp_path / "datasets" / "xm3600"
    records = []
    for n, key in enumerate(("000411001ff7dd4f", "0019fa9d4a9f1a8e")):
        _image(root / "images" / f"{key}.jpg")
        record = {"image/key": key, "image/locale": "de"}
        for code, caps in _XM.items():
            caps = [f"{c} ({n})" for c in caps]
            record[code] = {
                "caption": caps,
                "caption/tokenized": caps,
                "caption/tokenized/lowercase": caps,
            }
        records.append(record)
    _write_jsonl(root / "captions.jsonl", records)
    return root


def test_xm3600_first_caption_per_language(xm3600):
    s = load_benchmark("xm3600", xm3600.parent)  # clip_benchmark's <root>/xm3600/ is found
    assert s.name == "xm3600"
    _assert_well_formed(s)
    assert [p.name for p in s.images] == ["000411001ff7dd4f.jpg", "0019fa9d4a9f1a8e.jpg"]
    assert s.caption_language == ["de", "de", "en", "en", "zh", "zh"]
    assert s.caption_image == [0, 1, 0, 1, 0, 1]
    assert s.captions == [
        "Ein roter Bus. (0)", "Ein roter Bus. (1)",
        "A red bus. (0)", "A red bus. (1)",
        "一辆红色的公共汽车。 (0)", "一辆红色的公共汽车。 (1)",
    ]  # fmt: skip


def test_xm3600_languages_filter_and_limit(xm3600):
    s = load_benchmark("xm3600", xm3600, languages=["zh", "en"], limit=1)
    assert len(s.images) == 1
    assert list(zip(s.caption_language, s.captions, strict=True)) == [
        ("zh", "一辆红色的公共汽车。 (0)"),
        ("en", "A red bus. (0)"),
    ]
    with pytest.raises(
        InputError, match=r"language\(s\) fr not in captions\.jsonl; available: de, en, zh"
    ):
        load_benchmark("xm3600", xm3600, languages=["en", "fr"])


def test_xm3600_errors(xm3600):
    file = xm3600 / "captions.jsonl"
    lines = file.read_text("utf-8").splitlines()
    (xm3600 / "images" / "0019fa9d4a9f1a8e.jpg").unlink()
    with pytest.raises(
        InputError,
        match=r"images/0019fa9d4a9f1a8e\.jpg not found \(named by captions\.jsonl line 2\)",
    ):
        load_benchmark("xm3600", xm3600)
    broken = json.loads(lines[1])
    del broken["de"]
    file.write_text(lines[0] + "\n" + json.dumps(broken) + "\n", "utf-8")
    _image(xm3600 / "images" / "0019fa9d4a9f1a8e.jpg")
    with pytest.raises(
        InputError,
        match=r"captions\.jsonl line 2 \(image/key 0019fa9d4a9f1a8e\) has no 'de' captions",
    ):
        load_benchmark("xm3600", xm3600)
    file.write_text(lines[0] + "\n{not json\n", "utf-8")
    with pytest.raises(InputError, match=r"captions\.jsonl: line 2 is not valid JSON"):
        load_benchmark("xm3600", xm3600)
    with pytest.raises(InputError, match="only to the xm3600 layout"):
        load_benchmark("docci", xm3600, languages=["en"])


# --- table -----------------------------------------------------------------------------------

_ROWS = [
    ("images/b.jpg", "a blue circle"),
    ("images/a.png", "a red star"),
    ("images/b.jpg", "round and blue"),
]


def _table_dir(tmp_path: Path, fmt: str) -> Path:
    root = tmp_path / f"table_{fmt}"
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.jpg")
    rows = [
        {"img": image, "text": caption, "key": str(i)} for i, (image, caption) in enumerate(_ROWS)
    ]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    elif fmt == "jsonl":
        _write_jsonl(root / "pairs.jsonl", rows)
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(("key", "img", "text"))] + [
            sep.join((r["key"], r["img"], r["text"])) for r in rows
        ]
        (root / f"pairs.{fmt}").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_table_groups_rows_by_image(tmp_path, fmt):
    root = _table_dir(tmp_path, fmt)
    s = load_benchmark("table", root, image_column="img", caption_column="text")
    assert s.name == f"table_{fmt}"
    _assert_well_formed(s)
    assert _pairs(s) == [
        ("b.jpg", "a blue circle"),
        ("b.jpg", "round and blue"),
        ("a.png", "a red star"),
    ]
    assert s.caption_image == [0, 0, 1]
    limited = load_benchmark(
        "table", root / f"pairs.{fmt}", image_column="img", caption_column="text", limit=1
    )
    assert _pairs(limited) == [("b.jpg", "a blue circle"), ("b.jpg", "round and blue")]


def test_table_absolute_image_paths(tmp_path):
    image = _image(tmp_path / "elsewhere" / "x.jpg")
    file = tmp_path / "t" / "pairs.csv"
    file.parent.mkdir()
    file.write_text(f'image,caption\n{image},"a caption, with a comma"\n')
    s = load_benchmark("table", file)
    assert s.images == [image]
    assert s.captions == ["a caption, with a comma"]


def test_table_errors(tmp_path):
    root = _table_dir(tmp_path, "csv")
    with pytest.raises(
        InputError, match=r"column 'image' not found in .*pairs\.csv; columns found: key, img, text"
    ):
        load_benchmark("table", root, caption_column="text")
    (root / "images" / "a.png").unlink()
    with pytest.raises(
        InputError, match=r"image images/a\.png not found \(named by pairs\.csv row 2\)"
    ):
        load_benchmark("table", root, image_column="img", caption_column="text")
    _write_jsonl(root / "more.jsonl", [{"img": "images/b.jpg", "text": ""}])
    with pytest.raises(InputError, match=r"exactly one table .* found 2: more\.jsonl, pairs\.csv"):
        load_benchmark("table", root)
    with pytest.raises(InputError, match=r"more\.jsonl row 1 has no text in 'text'"):
        load_benchmark("table", root / "more.jsonl", image_column="img", caption_column="text")
    (root / "more.jsonl").write_text('{"img": "images/b.jpg", "text": "ok"}\n{"img": \n')
    with pytest.raises(InputError, match=r"more\.jsonl: line 2 is not valid JSON"):
        load_benchmark("table", root / "more.jsonl", image_column="img", caption_column="text")


# --- general ---------------------------------------------------------------------------------


def test_unknown_layout_missing_path_and_bad_limit(tmp_path):
    with pytest.raises(
        InputError, match="unknown benchmark layout 'coco'; use one of: " + ", ".join(LAYOUTS)
    ):
        load_benchmark("coco", tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_benchmark("urban1k", tmp_path / "nope")
    with pytest.raises(InputError, match="limit must be at least 1"):
        load_benchmark("urban1k", tmp_path, limit=0)


def test_empty_sets_are_refused(tmp_path):
    _write_jsonl(tmp_path / "docci_descriptions.jsonlines", [])
    with pytest.raises(InputError, match="no images in split 'test'"):
        load_benchmark("docci", tmp_path)
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(InputError, match="holds no images"):
        load_benchmark("xm3600", tmp_path)
    (tmp_path / "t.csv").write_text("image,caption\n")
    with pytest.raises(InputError, match="no images found"):
        load_benchmark("table", tmp_path / "t.csv")


# --- the synthetic dataset's eval splits -----------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    write_synth(out, SynthConfig(n=30, n_retrieval=6, n_zeroshot_per_class=1), progress=False)
    return out


def test_synth_zeroshot_shape_loads_as_imagefolder(synth):
    root = synth / "eval" / "zeroshot_shape"
    s = load_benchmark("imagefolder", root)
    assert len(s.classes) == 9
    assert s.classes == (root / "classes.txt").read_text().split()
    assert sorted(s.labels) == list(range(9))  # one image per class
    for path, label in zip(s.images, s.labels, strict=True):
        assert path.parent.name == s.classes[label]  # shape folders are named by the class


def test_synth_color_shape_class_names(synth):
    s = load_benchmark("imagefolder", synth / "eval" / "zeroshot_color_shape")
    for path, label in zip(s.images, s.labels, strict=True):
        assert path.parent.name.replace("_", " ") == s.classes[label]  # e.g. "red star"


def test_synth_retrieval_loads_as_table(synth):
    root = synth / "eval" / "retrieval"
    s = load_benchmark("table", root, caption_column="long_caption")
    assert s.name == "retrieval"
    _assert_well_formed(s)
    rows = pq.read_table(root / "captions.parquet").to_pylist()
    assert [p.relative_to(root).as_posix() for p in s.images] == [r["image"] for r in rows]
    assert s.captions == [r["long_caption"] for r in rows]
    assert s.caption_image == list(range(6))
