"""Prompt templates, caption clean-up and recipes: *what* stage one embeds.

A recipe is a small, serialisable description of the cache it produces: the model and its
fingerprint, pooling, layer, caption clean-up, truncation, prompt groups and storage. The
built-in recipes follow FLAME (arXiv 2411.11927) and LLM2CLIP (arXiv 2411.04997); users can
write their own TOML file with the same fields (see ``Recipe.from_toml``).

Templates are split into (prefix, caption, suffix, facet) pieces because the token ids of
``BOS + prefix + caption + suffix`` (the *context*) must be identical for every facet of a
caption: the hf engine packs the context once, and vLLM's prefix cache reuses it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from store.errors import FacetclipError
from store.tomlfile import dump_toml, read_toml

# --- FLAME's prompts (papers.md §1, from the public code) ------------------------------------

LONG_PREFIX = 'Detailed Image description : "'
SHORT_PREFIX = 'Image description : "'
CONTEXT_SUFFIX = '" . After thinking step by step ,'
_ONE_WORD = ' means in just one word:"'

# The 7 long facets, in FLAME's order. Names are the cache's column names.
LONG_FACETS: dict[str, str] = {
    "description": " this image description" + _ONE_WORD,
    "main_object": " the category of the main object in this image" + _ONE_WORD,
    "main_characteristic": " the prominent characteristic or pattern of the main object in this image"
    + _ONE_WORD,
    "minor_object": " the category of the minor object in this image" + _ONE_WORD,
    "minor_characteristic": " the prominent characteristic or pattern of the minor object in this image"
    + _ONE_WORD,
    "action": " the primary action or event taking place in this image" + _ONE_WORD,
    "atmosphere": " the overall atmosphere or emotion of this image" + _ONE_WORD,
}
# The short set is facets 1-3; prefixed so they do not collide with the long facets' columns.
SHORT_FACETS: dict[str, str] = {
    "short_" + name: LONG_FACETS[name]
    for name in ("description", "main_object", "main_characteristic")
}
# The single "raw" prompt (used for alt-text, zero-shot class prompts and multilingual queries).
RAW_FACETS: dict[str, str] = {"raw": LONG_FACETS["description"]}

# "pformer": the N prompt vectors a P-Former predictor makes of a caption (papers.md §3);
# "pformer-code": its pooled code only (the compact form; the head that expands it is kept in
# the cache, store.prompts). Both are computed by embed.pformer_engine, not by an LLM.
PFORMER_POOLINGS = ("pformer", "pformer-code")
POOLINGS = ("last", "mean", *PFORMER_POOLINGS)
CLEANUPS = ("flame", "none")
DTYPES = ("float16", "float32", "int8")


class RecipeError(FacetclipError):
    """A recipe file or name is invalid."""


def clean_caption(text: str, style: str = "flame") -> str:
    """FLAME's caption clean-up: strip, end with a full stop unless it ends in . ? " ',
    and replace double quotes by single quotes (the prompt itself quotes the caption).

    >>> clean_caption('A "red" star')
    "A 'red' star."
    """
    if style == "none":
        return text
    text = text.strip()
    if text and text[-1] not in ".?\"'":
        text += "."
    return text.replace('"', "'")


@dataclass(frozen=True)
class PromptGroup:
    """One context (prefix + caption from ``column`` + suffix) followed by K facet prompts.

    With ``pooling = "mean"`` a group has no facets and yields one vector: the mean of the
    caption's own tokens.
    """

    column: str
    prefix: str = ""
    suffix: str = ""
    facets: dict[str, str] = field(default_factory=dict)
    # Name of the single vector a mean-pooled group produces.
    mean_name: str = "mean"

    def vector_names(self, pooling: str) -> list[str]:
        return [self.mean_name] if pooling == "mean" else list(self.facets)


@dataclass(frozen=True)
class Recipe:
    """What is embedded, and how. Written to ``CACHE/recipe.toml``; a cache holds one recipe."""

    name: str
    groups: tuple[PromptGroup, ...]
    pooling: str = "last"
    # hidden_states[layer] in transformers' convention: the output of the first `layer`
    # decoder layers (1..num_hidden_layers); -1 = all layers. FLAME reads decoder layer
    # index 38 of Mistral-Nemo's 40, i.e. layer = 39.
    layer: int = -1
    # Apply the model's final norm to the chosen layer (always applied for the last layer).
    final_norm: bool = True
    cleanup: str = "flame"
    max_caption_tokens: int = 1024
    normalize: bool = True
    dtype: str = "float16"
    # Filled in by `embed` from the model actually loaded.
    model: str = ""
    model_fingerprint: str = ""
    # pformer poolings: prompt vectors per caption, filled in by `embed` from the predictor.
    prompts: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise RecipeError(
                f"recipe {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}"
            )
        if self.cleanup not in CLEANUPS:
            raise RecipeError(
                f"recipe {self.name!r}: cleanup must be one of {CLEANUPS}, got {self.cleanup!r}"
            )
        if self.dtype not in DTYPES:
            raise RecipeError(
                f"recipe {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}"
            )
        if self.layer == 0 or self.layer < -1:
            raise RecipeError(
                f"recipe {self.name!r}: layer must be -1 (last) or >= 1, got {self.layer}"
            )
        if not 1 <= self.max_caption_tokens <= 1_000_000:
            raise RecipeError(f"recipe {self.name!r}: max_caption_tokens must be in 1..1000000")
        if not self.groups:
            raise RecipeError(f"recipe {self.name!r}: needs at least one prompt group")
        if self.pooling in PFORMER_POOLINGS:
            g = self.groups[0]
            if len(self.groups) != 1 or g.facets or g.prefix or g.suffix:
                raise RecipeError(
                    f"recipe {self.name!r}: a {self.pooling} recipe has one prompt group with a "
                    "column only (no prefix, suffix or facets): the predictor reads the bare caption"
                )
            if self.normalize:
                raise RecipeError(
                    f"recipe {self.name!r}: prompt vectors are inputs of the LLM, not directions; "
                    "set normalize = false"
                )
        for g in self.groups:
            if self.pooling == "last" and not g.facets:
                raise RecipeError(
                    f"recipe {self.name!r}: group on column {g.column!r} has no facets"
                )
            if self.pooling == "mean" and g.facets:
                raise RecipeError(
                    f"recipe {self.name!r}: mean pooling averages the caption; remove the facets of group {g.column!r}"
                )
        names = self.vector_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RecipeError(f"recipe {self.name!r}: vector names repeat across groups: {dup}")

    @property
    def vector_names(self) -> list[str]:
        """Names of the vectors stored per row, in order (one cache column each)."""
        if self.pooling == "pformer":
            width = max(2, len(str(self.prompts - 1)))
            return [f"prompt_{i:0{width}d}" for i in range(self.prompts)]
        if self.pooling == "pformer-code":
            return ["code"]
        return [n for g in self.groups for n in g.vector_names(self.pooling)]

    @property
    def columns(self) -> list[str]:
        """Caption columns this recipe reads, in first-use order."""
        return list(dict.fromkeys(g.column for g in self.groups))

    def with_columns(self, mapping: dict[str, str]) -> Recipe:
        """Rename caption columns (e.g. ``{"long_caption": "text"}``) without touching prompts."""
        groups = tuple(replace(g, column=mapping.get(g.column, g.column)) for g in self.groups)
        return replace(self, groups=groups)

    # --- TOML ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = [asdict(g) for g in self.groups]
        if self.pooling not in PFORMER_POOLINGS:
            # Caches made before the pformer recipes existed have no such field; omitting it
            # keeps their recipe.toml equal to what this version writes, so they still resume.
            del d["prompts"]
        return d

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            groups = tuple(PromptGroup(**g) for g in d.pop("groups", []))
        except TypeError as e:
            raise RecipeError(f"bad prompt group: {e}") from None
        return cls(groups=groups, **d)

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        return cls.from_dict(read_toml(path, "recipe file", RecipeError))


def _flame_group(column: str, prefix: str, facets: dict[str, str]) -> PromptGroup:
    return PromptGroup(column=column, prefix=prefix, suffix=CONTEXT_SUFFIX, facets=dict(facets))


BUILTIN_RECIPES: dict[str, Recipe] = {
    # 11 vectors per row: 1 raw (alt-text) + 3 short-caption facets + 7 long-caption facets.
    "flame": Recipe(
        name="flame",
        groups=(
            _flame_group("caption", SHORT_PREFIX, RAW_FACETS),
            _flame_group("short_caption", SHORT_PREFIX, SHORT_FACETS),
            _flame_group("long_caption", LONG_PREFIX, LONG_FACETS),
        ),
    ),
    "flame-long": Recipe(
        name="flame-long", groups=(_flame_group("long_caption", LONG_PREFIX, LONG_FACETS),)
    ),
    "prompteol": Recipe(
        name="prompteol", groups=(_flame_group("long_caption", SHORT_PREFIX, RAW_FACETS),)
    ),
    # LLM2CLIP: mean over the caption's own tokens, no prompt, no clean-up.
    "llm2clip": Recipe(
        name="llm2clip",
        groups=(PromptGroup(column="long_caption"),),
        pooling="mean",
        cleanup="none",
        max_caption_tokens=512,
    ),
    # P-Former (papers.md §3): per caption, the N prompt vectors a trained predictor
    # (`facetclip pformer`) makes of it, in the LLM's input-embedding space; `--model` is the
    # predictor. Clean-up and truncation are the predictor's own (filled in by `embed`).
    "pformer": Recipe(
        name="pformer",
        groups=(PromptGroup(column="long_caption"),),
        pooling="pformer",
        cleanup="none",
        normalize=False,
    ),
    # The compact form: the predictor's pooled code per caption (width of its encoder), and
    # the small head that expands it to the N prompts stored once in the cache.
    "pformer-code": Recipe(
        name="pformer-code",
        groups=(PromptGroup(column="long_caption"),),
        pooling="pformer-code",
        cleanup="none",
        normalize=False,
    ),
}


def get_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a user recipe from a TOML file path."""
    if name_or_path in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        return Recipe.from_toml(p)
    raise RecipeError(
        f"unknown recipe {name_or_path!r}; built-ins: {', '.join(BUILTIN_RECIPES)}, or a .toml file"
    )
