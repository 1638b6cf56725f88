"""Evaluation datasets on local disk, read in the layout their publishers release them in.

Nothing is downloaded. ``load_benchmark(layout, ROOT)`` returns a ``RetrievalSet`` (images and
captions, several captions per image allowed) or a ``ClassificationSet`` (images, labels, class
names). ROOT is the folder named below; where a release unpacks into a named subfolder
(``Urban1k/``, ``densely_captioned_images/``, ``xm3600/``) its parent is accepted too. Layouts
follow how the public evaluation code of FLAME (MIV-XJTU/FLAME ``src/training/eval_*.py``),
Long-CLIP (beichenzbc/Long-CLIP ``eval/``), LoTLIP (wuw2019/LoTLIP ``dataloaders/``) and
clip_benchmark (LAION-AI/CLIP_benchmark) read each dataset, so numbers are comparable.

``imagefolder`` -> ClassificationSet (torchvision ``ImageFolder`` convention)::

    ROOT/<class_dir>/**/<image>     .jpg .jpeg .png .bmp .ppm .pgm .tif .tiff .webp (any case)
    ROOT/classes.txt                optional: one class name per line, in sorted folder order
                                    (else the folder name with "_" -> " ")

  Class folders are sorted by name (Python ``sorted``), label = position; images are sorted
  within each class. Folders and files starting with "." are ignored.

``karpathy`` -> RetrievalSet (Karpathy splits of COCO / Flickr30k / Flickr8k)::

    ROOT/dataset_coco.json | dataset_flickr30k.json | dataset_flickr8k.json   (exactly one;
                                    or pass the JSON file itself, ROOT is then its folder)
      {"images": [{"filepath": "val2014" (COCO only), "filename": "...jpg", "split": "test",
                   "sentences": [{"raw": "A man riding a horse."}, ...]}, ...]}
    images at ROOT/<filepath>/<filename> (COCO: ROOT/val2014/..., ROOT/train2014/...) or, for
    Flickr, ROOT/flickr30k-images/<filename>, ROOT/flickr30k_images/..., ROOT/images/...,
    ROOT/<filename>; the first folder holding the first image is used for all.

  ``split``: test (default), val, train, restval, or all. Every sentence of an image is kept
  (COCO test: 5000 images, 25010 captions; some images have 6 or 7).

``urban1k`` -> RetrievalSet (Urban-1k as released at huggingface.co/datasets/BeichenZhang/Urban1k,
Urban1k.zip; read like Long-CLIP / FLAME ``eval_urban_1k.py``)::

    ROOT/image/<n>.jpg              1000 images
    ROOT/caption/<n>.txt            its long caption (the first line, as the public code reads it)

  Pairs are matched by file stem and ordered numerically (1, 2, ..., 10, ...). No splits.

``dci`` -> RetrievalSet (Densely Captioned Images, github.com/facebookresearch/DCI, dci.tar.gz
plus photos from SA-1B sa_000138.tar; read like FLAME ``eval_dci.py`` and LoTLIP
``dci_retrieval.py``)::

    ROOT/densely_captioned_images/splits.json    {"train": [NAME.json, ...], "valid": [...],
                                                  "test": [...]}
    ROOT/densely_captioned_images/annotations/NAME.json   {"image": "sa_123.jpg",
                                                  "short_caption": ..., "extra_caption": ...}
                                                  (complete/ is used when annotations/ is absent)
    ROOT/densely_captioned_images/photos/<image>

  Caption = FLAME's: ``short_caption + "\\n" + extra_caption``, split at newlines, "</s>" and
  ".", pieces stripped, empties dropped, joined with ". ". ``split``: test, valid (or val),
  train, or all. The long-caption retrieval numbers of FLAME / LoTLIP / Long-CLIP-style papers
  use ALL 7805 images: pass ``split="all"`` to reproduce them.

``docci`` -> RetrievalSet (DOCCI, google.github.io/docci: docci_descriptions.jsonlines +
docci_images.tar.gz; read like FLAME ``eval_docci.py``)::

    ROOT/docci_descriptions.jsonlines   one JSON object per line: {"example_id": "test_00001",
                                        "split": "test", "image_file": "test_00001.jpg",
                                        "description": "..."}
    ROOT/images/<image_file>

  Newlines in a description become spaces. ``split``: test (5000, default), train, qual_dev,
  qual_test, or all.

``xm3600`` -> RetrievalSet with ``caption_language`` (Crossmodal-3600,
google.github.io/crossmodal-3600: captions.zip + images.tgz; layout of clip_benchmark's
``crossmodal3600.py``)::

    ROOT/captions.jsonl     one image per line: {"image/key": "000411001ff7dd4f",
                            "image/locale": "ar", "en": {"caption": ["...", "..."],
                            "caption/tokenized": [...], ...}, "de": {...}, ... 36 languages}
    ROOT/images/<image/key>.jpg

  For each image and language, the FIRST caption is kept, as clip_benchmark does (the protocol
  of FLAME's reported XM3600 numbers): per language the set is 3600 image-caption pairs.
  Captions are ordered language by language (sorted codes, or the order of ``languages``),
  images in file order within each. ``languages`` selects codes; default: all in the file.

``table`` -> RetrievalSet (any image-caption table)::

    ROOT = a .parquet, .csv, .tsv, .jsonl or .ndjson file (.csv/.tsv/.jsonl may be .gz), or a
    folder holding exactly one such file. Columns ``image_column`` (default "image": a path
    relative to the table's folder, or absolute) and ``caption_column`` (default "caption").
    Rows naming the same image give one image with several captions, in row order.
    The synthetic dataset's ``eval/retrieval`` loads with ``caption_column="long_caption"``.

``split`` applies to karpathy, dci and docci; the other layouts have none and accept only the
default ("test") or "all": point ROOT at the split's own folder instead. ``limit`` keeps the
first N images (annotation order, or sorted file names) with all their captions; for
``imagefolder`` it takes images class by class in turn (the first image of every class, then
the second, ...), so a small limit still covers every class. Every kept image must exist.

Errors a user can cause raise ``store.errors.InputError`` naming the file (and the line or
entry), e.g. ``urban1k (/data/Urban1k): caption/17.txt has no matching image image/17.jpg``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.errors import InputError
from store.images import IMAGE_SUFFIXES, is_image
from store.tables import CaptionSource, iter_caption_batches, iter_jsonl, listing, table_format

LAYOUTS = ("imagefolder", "karpathy", "urban1k", "dci", "docci", "xm3600", "table")

# The 36 language codes of Crossmodal-3600 (the same list as clip_benchmark and big_vision).
XM3600_LANGUAGES = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr",
    "he", "hi", "hr", "hu", "id", "it", "ja", "ko", "mi", "nl", "no", "pl",
    "pt", "quz", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk", "vi", "zh",
)  # fmt: skip


@dataclass
class RetrievalSet:
    """Images and captions for image<->text retrieval.

    ``caption_image[i]`` is the index into ``images`` of the image caption i describes; an image
    may have several captions (COCO style). ``caption_language[i]`` is caption i's language code
    where the set is multilingual (xm3600), else None.
    """

    name: str
    images: list[Path]
    captions: list[str]
    caption_image: list[int]
    caption_language: list[str] | None = None


@dataclass
class ClassificationSet:
    """Images with one label each; ``classes[label]`` is the human-readable class name used in
    zero-shot prompts (e.g. "red star")."""

    name: str
    images: list[Path]
    labels: list[int]
    classes: list[str]


def load_benchmark(
    layout: str,
    path: str | Path,
    *,
    split: str = "test",
    limit: int | None = None,
    caption_column: str = "caption",
    image_column: str = "image",
    languages: Sequence[str] | None = None,
) -> RetrievalSet | ClassificationSet:
    """Read an evaluation dataset from local disk (layouts: see the module docstring).

    >>> s = load_benchmark("urban1k", "data/Urban1k")  # doctest: +SKIP
    >>> len(s.images), len(s.captions), s.caption_image[:3]  # doctest: +SKIP
    (1000, 1000, [0, 1, 2])
    >>> load_benchmark("table", "synth/eval/retrieval", caption_column="long_caption")  # doctest: +SKIP
    >>> load_benchmark("xm3600", "data/xm3600", languages=["en", "de"])  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown benchmark layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"{layout}: {root} does not exist")
    if limit is not None and limit < 1:
        raise InputError(f"{layout}: limit must be at least 1, got {limit}")
    if languages is not None and layout != "xm3600":
        raise InputError(f"{layout}: languages applies only to the xm3600 layout")
    if layout in ("imagefolder", "urban1k", "xm3600", "table") and split not in ("test", "all"):
        raise InputError(
            f"{layout} has no splits (got split={split!r}); point the path at the split's own "
            "folder or table instead"
        )
    if layout == "imagefolder":
        return _load_imagefolder(root, limit)
    if layout == "karpathy":
        return _load_karpathy(root, split, limit)
    if layout == "urban1k":
        return _load_urban1k(root, limit)
    if layout == "dci":
        return _load_dci(root, split, limit)
    if layout == "docci":
        return _load_docci(root, split, limit)
    if layout == "xm3600":
        return _load_xm3600(root, limit, languages)
    return _load_table(root, limit, caption_column, image_column)


# --- shared helpers --------------------------------------------------------------------------


def _shown(path: Path, root: Path) -> str:
    """A path as the user knows it: relative to the dataset root where it lies under it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _natural_key(name: str) -> tuple:
    """Sort key that orders "2.jpg" before "10.jpg" (Urban-1k names images 1..1000)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _read_json(file: Path, where: str) -> Any:
    """A whole JSON file; errors name the file, and the line and column of a syntax error."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{where}: {file} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read {file}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where}: {file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None


def _iter_jsonl(file: Path, where: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON-lines file (store.tables'
    reader: its errors name the file and line)."""
    if not file.is_file():
        raise InputError(f"{where}: {file} not found")
    yield from iter_jsonl(file)


def _field(record: dict, name: str, where: str, what: str, kind: type = str) -> Any:
    """record[name], which must be a non-empty value of ``kind``; errors say which entry."""
    value = record.get(name)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        found = "missing" if name not in record else f"{type(value).__name__} {value!r:.60}"
        raise InputError(f"{where}: {what} needs a non-empty {kind.__name__} {name!r} ({found})")
    return value


def _check_images(where: str, root: Path, images: list[Path], sources: list[str]) -> None:
    """Every image must be a file; the error names the first missing one and who refers to it."""
    missing = [i for i, p in enumerate(images) if not p.is_file()]
    if missing:
        i = missing[0]
        more = f" ({len(missing)} of {len(images)} images are missing)" if len(missing) > 1 else ""
        raise InputError(
            f"{where}: image {_shown(images[i], root)} not found (named by {sources[i]}){more}"
        )


def _retrieval_set(
    name: str,
    where: str,
    root: Path,
    entries: list[tuple[Path, list[str], str]],
    limit: int | None,
) -> RetrievalSet:
    """Build a RetrievalSet from (image, captions, source) in order, keeping the first ``limit``."""
    if not entries:
        raise InputError(f"{where}: no images found")
    entries = entries[:limit]
    images = [image for image, _, _ in entries]
    _check_images(where, root, images, [source for _, _, source in entries])
    captions: list[str] = []
    caption_image: list[int] = []
    for i, (_, caps, _) in enumerate(entries):
        captions += caps
        caption_image += [i] * len(caps)
    return RetrievalSet(name=name, images=images, captions=captions, caption_image=caption_image)


def _split_error(where: str, file: Path, split: str, present: Sequence[str]) -> InputError:
    return InputError(
        f"{where}: {file.name} has no images in split {split!r}; splits present: "
        f"{', '.join(present) or 'none'} (or 'all')"
    )


# --- imagefolder -----------------------------------------------------------------------------


def _load_imagefolder(root: Path, limit: int | None) -> ClassificationSet:
    where = f"imagefolder ({root})"
    if not root.is_dir():
        raise InputError(f"{where}: not a folder; imagefolder needs ROOT/<class>/<image> folders")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"{where}: no class folders (expected ROOT/<class>/<image>)")

    names_file = root / "classes.txt"
    if names_file.is_file():
        try:
            lines = names_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{where}: cannot read {names_file}: {e}") from None
        classes = [line.strip() for line in lines if line.strip()]
        if len(classes) != len(folders):
            raise InputError(
                f"{where}: classes.txt names {len(classes)} classes but there are "
                f"{len(folders)} class folders; it needs one name per line, in sorted folder "
                f"order ({', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''})"
            )
    else:
        classes = [name.replace("_", " ") for name in folders]

    per_class: list[list[Path]] = []
    for folder in folders:
        found = []
        # Recursive like torchvision's ImageFolder; sorted so the order is the same everywhere.
        for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in sorted(filenames) if is_image(Path(f))]
        if not found:
            raise InputError(
                f"{where}: class folder {folder}/ holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        per_class.append(found)

    # Class by class in turn, so that a limit keeps every class represented; without a limit
    # this is simply every image, grouped in round-robin order.
    images: list[Path] = []
    labels: list[int] = []
    for rank in range(max(len(found) for found in per_class)):
        for label, found in enumerate(per_class):
            if rank < len(found):
                images.append(found[rank])
                labels.append(label)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ClassificationSet(name=root.name, images=images, labels=labels, classes=classes)


# --- karpathy --------------------------------------------------------------------------------

# Where a Karpathy JSON's images may lie, relative to its folder (COCO entries add "filepath").
_KARPATHY_IMAGE_DIRS = ("", "flickr30k-images", "flickr30k_images", "images", "Images")


def _load_karpathy(root: Path, split: str, limit: int | None) -> RetrievalSet:
    where = f"karpathy ({root})"
    if root.is_file():
        file = root
    else:
        found = sorted(root.glob("dataset_*.json"))
        if len(found) != 1:
            raise InputError(
                f"{where}: expected exactly one dataset_*.json (dataset_coco.json, "
                f"dataset_flickr30k.json, ...), found {len(found)}"
                + (f": {', '.join(p.name for p in found)}; pass the file itself" if found else "")
            )
        file = found[0]
    base = file.parent
    data = _read_json(file, where)
    records = data.get("images") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise InputError(f'{where}: {file.name} needs a top-level {{"images": [...]}} list')

    selected: list[tuple[Path, list[str], str]] = []
    present: list[str] = []
    for i, record in enumerate(records):
        what = f"{file.name} images[{i}]"
        if not isinstance(record, dict):
            raise InputError(f"{where}: {what} is not a JSON object")
        record_split = _field(record, "split", where, what)
        if record_split not in present:
            present.append(record_split)
        if split != "all" and record_split != split:
            continue
        filename = _field(record, "filename", where, what)
        sentences = _field(record, "sentences", where, what, list)
        captions = []
        for j, sentence in enumerate(sentences):
            if not isinstance(sentence, dict):
                raise InputError(f"{where}: {what} sentences[{j}] is not a JSON object")
            captions.append(_field(sentence, "raw", where, f"{what} sentences[{j}]").strip())
        relative = Path(record.get("filepath") or "") / filename
        selected.append((relative, captions, what))
    if not selected:
        raise _split_error(where, file, split, present)

    # One image folder for the whole file: the first candidate that holds the first image.
    first = selected[0][0]
    tried = [base / d / first for d in _KARPATHY_IMAGE_DIRS]
    image_dir = next((base / d for d in _KARPATHY_IMAGE_DIRS if (base / d / first).is_file()), None)
    if image_dir is None:
        raise InputError(
            f"{where}: image {first.as_posix()} of {selected[0][2]} not found; tried "
            + ", ".join(str(p) for p in tried)
        )
    entries = [(image_dir / rel, caps, what) for rel, caps, what in selected]
    name = f"{file.stem.removeprefix('dataset_')}-{split}"
    return _retrieval_set(name, where, root if root.is_dir() else base, entries, limit)


# --- urban1k ---------------------------------------------------------------------------------


def _load_urban1k(root: Path, limit: int | None) -> RetrievalSet:
    base = root
    if not (root / "image").is_dir() and (root / "Urban1k" / "image").is_dir():
        base = root / "Urban1k"  # the parent of the folder Urban1k.zip unpacks into
    where = f"urban1k ({base})"
    for sub in ("image", "caption"):
        if not (base / sub).is_dir():
            raise InputError(
                f"{where}: folder {sub}/ not found (expected image/<n>.jpg, caption/<n>.txt)"
            )
    images: dict[str, Path] = {}
    for p in sorted((base / "image").iterdir()):
        if p.is_file() and is_image(p):
            if p.stem in images:
                raise InputError(
                    f"{where}: image/{images[p.stem].name} and image/{p.name} share a name"
                )
            images[p.stem] = p
    captions = {
        p.stem: p
        for p in (base / "caption").iterdir()
        if p.is_file() and p.suffix == ".txt" and not p.name.startswith(".")
    }
    for stem in sorted(captions, key=_natural_key):
        if stem not in images:
            raise InputError(f"{where}: caption/{stem}.txt has no matching image image/{stem}.jpg")
    for stem in sorted(images, key=_natural_key):
        if stem not in captions:
            raise InputError(
                f"{where}: image/{images[stem].name} has no matching caption caption/{stem}.txt"
            )

    entries = []
    for stem in sorted(images, key=_natural_key)[:limit]:
        file = captions[stem]
        try:
            text = file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{where}: cannot read caption/{file.name}: {e}") from None
        # Long-CLIP / FLAME / LoTLIP read the first line (the release has one line per file).
        lines = text.splitlines()
        caption = lines[0].strip() if lines else ""
        if not caption:
            raise InputError(
                f"{where}: caption/{file.name} is empty (its first line is the caption)"
            )
        entries.append((images[stem], [caption], f"caption/{file.name}"))
    return _retrieval_set("urban1k", where, base, entries, None)


# --- dci -------------------------------------------------------------------------------------


def _dci_caption(short_caption: str, extra_caption: str) -> str:
    """FLAME's (and LoTLIP's) DCI text: both captions, re-joined sentence by sentence."""
    pieces = re.split(r"\n|</s>|[.]", f"{short_caption}\n{extra_caption}")
    return ". ".join(p.strip() for p in pieces if p.strip())


def _load_dci(root: Path, split: str, limit: int | None) -> RetrievalSet:
    base = root
    if not (root / "splits.json").is_file() and (root / "densely_captioned_images").is_dir():
        base = root / "densely_captioned_images"
    where = f"dci ({base})"
    splits_file = base / "splits.json"
    if not splits_file.is_file():
        raise InputError(
            f"{where}: splits.json not found (expected ROOT/densely_captioned_images/splits.json, "
            "annotations/ and photos/, as dci.tar.gz unpacks)"
        )
    splits = _read_json(splits_file, where)
    if not isinstance(splits, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in splits.values()
    ):
        raise InputError(
            f"{where}: splits.json must map split names to lists of annotation files, "
            f'e.g. {{"test": ["sa_1.json", ...]}}'
        )
    wanted = "valid" if split == "val" and "val" not in splits else split
    if wanted == "all":
        names = [name for files in splits.values() for name in files]
    elif wanted in splits:
        names = splits[wanted]
    else:
        raise _split_error(where, splits_file, split, list(splits))
    if not names:
        raise _split_error(where, splits_file, split, [k for k, v in splits.items() if v])

    # DCI's own loader reads complete/; FLAME and LoTLIP read annotations/ (same fields).
    anno_dir = base / "annotations"
    if not anno_dir.is_dir() and (base / "complete").is_dir():
        anno_dir = base / "complete"
    entries = []
    for name in names[:limit]:
        file = anno_dir / name
        what = _shown(file, base)
        anno = _read_json(file, where)
        if not isinstance(anno, dict):
            raise InputError(f"{where}: {what} is not a JSON object")
        image = _field(anno, "image", where, what)
        short = _field(anno, "short_caption", where, what)
        extra = anno.get("extra_caption") or ""
        if not isinstance(extra, str):
            raise InputError(f"{where}: {what} has a non-string 'extra_caption'")
        entries.append((base / "photos" / image, [_dci_caption(short, extra)], what))
    return _retrieval_set(f"dci-{split}", where, base, entries, None)


# --- docci -----------------------------------------------------------------------------------


def _load_docci(root: Path, split: str, limit: int | None) -> RetrievalSet:
    file = root if root.is_file() else root / "docci_descriptions.jsonlines"
    base = file.parent
    where = f"docci ({base})"
    entries = []
    present: list[str] = []
    for lineno, record in _iter_jsonl(file, where):
        what = f"{file.name} line {lineno}"
        record_split = _field(record, "split", where, what)
        if record_split not in present:
            present.append(record_split)
        if split != "all" and record_split != split:
            continue
        _field(record, "example_id", where, what)
        image = _field(record, "image_file", where, what)
        # FLAME replaces the description's newlines by spaces.
        caption = _field(record, "description", where, what).replace("\n", " ").strip()
        entries.append((base / "images" / image, [caption], what))
    if not entries:
        raise _split_error(where, file, split, present)
    return _retrieval_set(f"docci-{split}", where, base, entries, limit)


# --- xm3600 ----------------------------------------------------------------------------------


def _load_xm3600(root: Path, limit: int | None, languages: Sequence[str] | None) -> RetrievalSet:
    base = root
    if not (root / "captions.jsonl").is_file() and (root / "xm3600" / "captions.jsonl").is_file():
        base = root / "xm3600"  # clip_benchmark keeps it in <dataset_root>/xm3600/
    where = f"xm3600 ({base})"
    file = base / "captions.jsonl"
    if isinstance(languages, str):
        languages = [languages]

    records: list[tuple[str, dict, str]] = []
    for lineno, record in _iter_jsonl(file, where):
        what = f"captions.jsonl line {lineno}"
        records.append((_field(record, "image/key", where, what), record, what))
        if limit is not None and len(records) == limit:
            break
    if not records:
        raise InputError(f"{where}: captions.jsonl holds no images")

    # A language is every field whose value is {"caption": [...], ...}.
    available = sorted(
        k for k, v in records[0][1].items() if isinstance(v, dict) and "caption" in v
    )
    if languages is None:
        chosen = available
    else:
        chosen = list(dict.fromkeys(languages))
        unknown = [code for code in chosen if code not in available]
        if unknown or not chosen:
            raise InputError(
                f"{where}: language(s) {', '.join(unknown) or '(none given)'} not in "
                f"captions.jsonl; available: {', '.join(available)}"
            )

    images = [base / "images" / f"{key}.jpg" for key, _, _ in records]
    _check_images(where, base, images, [what for _, _, what in records])
    captions: list[str] = []
    caption_image: list[int] = []
    caption_language: list[str] = []
    # Language by language, so each language's captions are one contiguous block.
    for code in chosen:
        for i, (key, record, what) in enumerate(records):
            entry = record.get(code)
            texts = entry.get("caption") if isinstance(entry, dict) else None
            if not isinstance(texts, list) or not texts or not isinstance(texts[0], str):
                raise InputError(
                    f"{where}: {what} (image/key {key}) has no {code!r} captions "
                    f'(expected "{code}": {{"caption": ["...", ...]}})'
                )
            # clip_benchmark keeps the first caption per image and language.
            captions.append(texts[0].strip())
            caption_image.append(i)
            caption_language.append(code)
    return RetrievalSet(
        name="xm3600",
        images=images,
        captions=captions,
        caption_image=caption_image,
        caption_language=caption_language,
    )


# --- table -----------------------------------------------------------------------------------


def _table_file(root: Path) -> Path:
    if root.is_file():
        if table_format(root) is None:
            raise InputError(
                f"table: {root} is not a table file (.parquet, .csv, .tsv, .jsonl, .ndjson)"
            )
        return root
    found = [p for p in listing(root) if table_format(p) is not None]
    if len(found) != 1:
        listed = f": {', '.join(p.name for p in found)}; pass one file" if found else ""
        raise InputError(
            f"table ({root}): expected exactly one table (.parquet, .csv, .tsv, .jsonl, .ndjson) "
            f"in the folder, found {len(found)}{listed}"
        )
    return found[0]


def _table_rows(file: Path, image_column: str, caption_column: str, where: str):
    """(row number from 1, image, caption) through the project's one table reader, its
    errors (a missing column, bad UTF-8, invalid JSON) prefixed with ``where``. The image path
    is the row's key, so a row without one is refused, naming it."""
    source = CaptionSource(file, key_column=image_column)
    try:
        for batch in iter_caption_batches(source, [caption_column]):
            captions = batch.columns[caption_column]
            for i, (image, caption) in enumerate(zip(batch.keys, captions, strict=True)):
                yield batch.start + i + 1, image, caption
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def _load_table(
    root: Path, limit: int | None, caption_column: str, image_column: str
) -> RetrievalSet:
    file = _table_file(root)
    base = file.parent
    where = f"table ({file})"
    by_image: dict[Path, tuple[list[str], str]] = {}
    for n, image, caption in _table_rows(file, image_column, caption_column, where):
        what = f"{file.name} row {n}"
        for column, value in ((image_column, image), (caption_column, caption)):
            if not isinstance(value, str) or not value.strip():
                raise InputError(
                    f"{where}: {what} has no text in {column!r} (empty, null or not text)"
                )
        path = Path(os.path.normpath(base / image.strip()))  # absolute paths stay as they are
        if path not in by_image:
            by_image[path] = ([], what)
        by_image[path][0].append(caption.strip())
    entries = [(path, caps, what) for path, (caps, what) in by_image.items()]
    name = base.name if root.is_dir() else file.name.split(".")[0]
    return _retrieval_set(name, where, base, entries, limit)
