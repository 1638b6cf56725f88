"""A small Llama causal LM and byte-level BPE tokenizer in Hugging Face format, for tests and
the demo. Nothing is downloaded: the tokenizer and the weights are trained here, from the
synthetic captions of ``eval.synth``.

    facetclip tiny-llm OUT                 # trained (a few minutes on 2 CPU cores)
    facetclip tiny-llm OUT --steps 0       # untrained weights, trained tokenizer (seconds)

    >>> from eval.tiny_llm import TinyLLMConfig, build_tiny_llm, probe_facets
    >>> build_tiny_llm("tiny", TinyLLMConfig(steps=0))          # doctest: +SKIP
    >>> probe_facets("tiny")                                      # doctest: +SKIP
    {'main_object': 0.52, 'main_characteristic': 0.41, ...}

Why pre-train on prompts *with answers* (DESIGN.md, "The small LM"): a real instruction-tuned
LLM asked ``…means in just one word:"`` holds the answer word in its last hidden state, which
is what makes facet vectors meaningful. The small LM gets the same property by next-token
prediction on the synthetic captions wrapped in the recipes' own prompts, each facet prompt
followed by that facet's true one-word answer, e.g.

    <s>Detailed Image description : "<long caption>" . After thinking step by step , the
    category of the main object in this image means in just one word:" star"</s>

A prompt group is trained the way the hf engine embeds it: the context ``BOS + prefix +
caption + suffix`` once, then every facet (with its answer) behind a block attention mask and
position ids that restart after the context (``embed.packing``). Each facet still sees exactly
its standalone sequence, but the long caption is computed once for 7 answers instead of 7
times, so the answers get most of the compute.

Why prefixed documents (``prefixed``): P-Former (``embed.pformer``) and captioning put soft
prompts *ahead of* BOS and ask the frozen LM to say the caption, which works only with an LM
whose next word depends on what came before. A real LLM learns that from packed web text; an
LM trained on one caption per sequence never needs its prefix (the first mention of the main
object is unpredictable from the caption's earlier words), so no prompt could steer it. So
each sample also gives documents like

    <s>a huge pink triangle above a small green heart, calm mood.</s><s>The centre of
    attention is a huge triangle in pink, …

where the caption's objects can be copied from the sketch before it. Measured (200 held-out
long captions, 157 naming the main object within 32 tokens; teacher-forced accuracy at its
first mention): with no prefix 0.09, after ``<s>sketch</s>`` 0.25 without prefixed documents
and 0.94 with two per sample (1,200 steps).

The output directory is a standard checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) that ``AutoModelForCausalLM`` /
``AutoTokenizer`` and vLLM load offline, plus ``training_log.json``.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from embed.packing import token_budget_batches
from embed.prompts import (
    CONTEXT_SUFFIX,
    LONG_FACETS,
    LONG_PREFIX,
    RAW_FACETS,
    SHORT_FACETS,
    SHORT_PREFIX,
    clean_caption,
)
from eval.synth import iter_samples
from store.errors import InputError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IGNORE = -100  # target of a position that predicts nothing

# Raw and short facets ask the same questions as these long facets, so share their answers.
ANSWER_OF = {
    **{name: name for name in LONG_FACETS},
    "raw": "description",
    "short_description": "description",
    "short_main_object": "main_object",
    "short_main_characteristic": "main_characteristic",
}
# Zero-shot classification prompts (CLIP style), wrapped in the raw prompt and answered with
# the main object's category, so class-name prompts land near the right facet vectors. Those
# that name a colour are also asked the main object and its characteristic (cheap, one-word-
# context lessons in which kind of word each of these facets asks for).
ZERO_SHOT_TEMPLATES = (
    "a photo of a {obj}.",
    "a {obj}.",
    "a photo of the {obj}.",
    "an image of a {obj}.",
    "a picture of a {obj}.",
    "a photo of a {char} {obj}.",
    "a {char} {obj}.",
    "a picture of a {char} {obj}.",
    "an image of the {char} {obj}.",
)
PROBE_FACETS = ("main_object", "main_characteristic", "minor_object", "atmosphere")
MAX_CAPTION_TOKENS = 512
# Answers are trained with a leading space (`...one word:" star"`): a byte-level BPE gives a
# word after a space its own token (" star" and "star" differ), and long and short captions
# and the sketches hold the spaced form (some raw alt-texts start with the shape). With it,
# answering a facet is copying a token of the caption; without it the model must also learn
# a second token per answer word, and held-out facet probes stayed near chance for colour,
# mood and often the main object (see TinyLLMConfig).
ANSWER_SPACE = " "
# Prefixed documents (``TinyLLMConfig.prefixed``): a scene sketch, then the opening of a caption
# of the same scene, as one sequence. 48 tokens reach the main object's first mention in most
# long captions; the rest of a caption teaches nothing about the prefix and costs tokens.
PREFIXED_TOKENS = 48
HELDOUT_CAPTIONS = 32  # captions after the training range whose loss is reported


@dataclass
class TinyLLMConfig:
    """Size and training budget of the small LM; ``steps=0`` keeps the random initial
    weights (the tokenizer is still trained).

    Chosen with the held-out facet probe (``probe_facets``: nearest centroid, 200 long
    captions beyond the training range; main object / main colour / minor object / mood;
    chance 1/9 for shapes and colours, 1/6 for moods), one thread each, two runs at a time;
    "steps" is where the probe was read, "a/b" read at step a of a b-step schedule:

    ====================================================  ==========================  ======
    change (cumulative unless marked)                     probe                       steps
    ====================================================  ==========================  ======
    before: 4 layers, 2 kv heads, lr 6e-3, answer w. 4    0.14 / 0.24 / 0.29 / 0.23   600
    answers with a space (ANSWER_SPACE)                   0.36 / 0.12 / 0.29 / 0.19   600
    lr 3e-3                                               0.09 / 0.23 / 0.27 / 0.88   600
    the same, 1200 steps                                  0.10 / 0.89 / 0.27 / 1.00   1200
    2 layers, 4 kv heads (twice as fast a step)           1.00 / 0.13 / 0.88 / 1.00   1200
    + 2 sketches per caption, half of them rich           0.11 / 0.98 / 0.26 / 1.00   1200
    (2 layers) answer weight 16, plain sketches           0.98 / 0.17 / 1.00 / 1.00   600/1200
    2 layers, rich sketches and answer weight 16          1.00 / 0.98 / 1.00 / 1.00   1200
    the same with a 600-step schedule                     1.00 / 0.13 / 0.42 / 0.15   500/600
    the same with a 2400-step schedule (2x longer)        1.00 / 1.00 / 1.00 / 1.00   2400
    the defaults on 2 threads (the demo's model)          0.99 / 0.17 / 0.71 / 1.00   1200
    defaults + 2 prefixed documents (1 thread)            1.00 / 0.21 / 1.00 / 1.00   1200
    the same with a 2400-step schedule                    1.00 / 0.98 / 1.00 / 1.00   2400
    defaults, rows regrouped (``regroup``), 2 threads     0.95 / 0.11 / 0.89 / 1.00   1200
    batch_tokens 2048 (2x the updates, same tokens)       1.00 / 0.13 / 0.94 / 0.18   2400
    lr 5e-3, seed 0 / seed 1                              1.00 / 0.99 / 0.75 / 1.00   1200
    lr 5e-3, a 2400-step schedule                         1.00 / 0.90 / 0.75 / 1.00   2400
    lr 5e-3 on 2 threads (demo, seeds 0 and 1)            1.00 / 0.17 / 0.87 / 1.00   1200
    lr 7e-3                                               0.87 / 0.52 / 0.52 / 0.10   1200
    (2026-11-30, one draw per row, none adopted; below, the first four set 2 threads)
    the defaults, seed 0                                  1.00 / 0.17 / 1.00 / 1.00   1200
    colour answers weighted 3x the other answers          0.96 / 0.26 / 0.68 / 0.40   1200
    2 more zero-shot prompts per sample, naming colour    0.99 / 0.95 / 0.68 / 0.28   1200
    the same, lr held to 80 % of the steps, then decayed  1.00 / 0.96 / 0.69 / 0.19   1200
    the same zero-shot prompts in the demo (seed 0)       1.00 / 0.13 / 0.66 / 0.17   1200
    the defaults, 1 thread, seeds 1 / 2 / 3               1.00 / 0.13 / 0.91 / 0.11   1200
                                                          1.00 / 1.00 / 0.77 / 0.96
                                                          0.70 / 0.38 / 0.51 / 0.15
    2 more zero-shot prompts, 1 thread, seeds 1 / 2 / 3   0.98 / 0.20 / 0.62 / 1.00   1200
                                                          1.00 / 0.20 / 0.63 / 0.20
                                                          1.00 / 0.13 / 0.66 / 0.22
    the defaults, 2400 steps, as the CLI runs (seed 0)    0.97 / 0.19 / 0.86 / 1.00   1200/2400
                                                          1.00 / 1.00 / 0.99 / 1.00   2400
    the same, seed 1                                      1.00 / 0.11 / 0.66 / 0.14   1200/2400
                                                          1.00 / 0.99 / 0.74 / 1.00   2400
    (2026-12-01, not adopted; the vocabulary rows as the CLI runs, seed 0 then seed 1)
    3 layers, 1 thread, seeds 1 / 3                       0.98 / 0.85 / 0.92 / 0.25   1200
                                                          1.00 / 0.11 / 1.00 / 0.11
    vocabulary 1536 (step 0.216 -> 0.147 s), seeds 0 / 1  1.00 / 0.62 / 0.83 / 1.00   1600
                                                          1.00 / 0.18 / 0.99 / 1.00
    vocabulary 1536, 2000 steps                           1.00 / 0.14 / 0.82 / 1.00   1200/2000
                                                          1.00 / 0.95 / 0.82 / 1.00   1200/2000
                                                          1.00 / 1.00 / 0.97 / 1.00   2000
                                                          1.00 / 1.00 / 0.80 / 1.00   2000
    the same, 4000 steps (2x the default), seed 0         0.96 / 0.12 / 0.81 / 0.24   1000/4000
                                                          1.00 / 1.00 / 0.98 / 1.00   2000/4000
                                                          1.00 / 0.99 / 0.98 / 1.00   3000/4000
                                                          1.00 / 0.98 / 0.98 / 1.00   4000
    2000 steps, seed 0, an Intel CPU with AMX (12-06)     1.00 / 1.00 / 0.93 / 1.00   2000
    ====================================================  ==========================  ======

    Each facet is learnt suddenly (a few hundred steps from chance to 0.9+), and which facets
    are learnt first varied from run to run: answering is copying a word of the caption, which
    fights what the captions teach the LM about the next shape or colour (the minor object's
    is always another one than the main object's, so "not the one already named" is a good
    guess there). Answer weight 16 lets copying win; the rich sketches teach which colour
    belongs to the main object. Trained 2x longer, all four are learnt from step ~1900 on and
    stay learnt. With the 3000-token vocabulary 1200 steps were what the demo could afford
    (about 4 minutes on 2 cores), and within them the colour (often the minor object too) was
    not learnt reliably. lr 5e-3 learnt it within 1200 steps in all three 1-thread runs, but in
    neither 2-thread demo run (0.17; the minor object 0.87 and 0.70), so the lr stays 3e-3.

    Probed every 200 steps (``probe_every``), the facets are learnt one after another, each
    within ~200 steps, about three of the four within 1200 steps, in an order that changes
    with the draw. The 1200-step demo LM never learnt the colour: asked the main object's
    characteristic after a plain sketch (``a red star above a small blue heart``) it answered
    " red" 95 times in 100 (it copied the main shape 97 times). Extra colour lessons (two
    more zero-shot prompts per sample that name the colour, each asked it) taught the colour
    in 1 of 5 draws, as many as without them, and cost the minor object in all five;
    weighting colour answers 3x slowed every facet, and so did (2026-12-01, seeds 0 / 1, at
    step 800 of 1600) weighting every answer 48x instead of 16x (colour 0.10 / 0.15, minor
    object 0.64 / 0.65). A third layer (12 % more training time) did not learn the colour
    sooner (seed 3: 0.11 at 1200 steps).

    What the default is (2026-12-01): a vocabulary of 1536 instead of 3000 holds the corpus's
    words as whole tokens as well (2,636,754 tokens per epoch vs 2,634,641) and makes a step
    1.47x faster on 2 threads (0.216 -> 0.147 s, median of 10; at 3000 entries the log-softmax
    alone took 15 % of a step, besides the LM head itself), so 2000 steps cost what 1360 did
    (284 s vs 246 s in the demo on a CPU with AVX512-BF16). With them both draws run as the
    CLI runs learnt the colour (from step ~1600 and ~1200); the demo's (seed 0) learnt all
    four facets (1.00 / 1.00 / 0.97 / 1.00 on two CPUs with AVX512-BF16, 1.00 / 1.00 / 1.00 /
    1.00 on one without), seed 1 left the minor object at 0.80. Trained 2x longer (4000
    steps, 1271 s on a slower CPU), seed 0 had all four at 0.98 or more from step 2000 to the
    end. Such an LM at first defeated P-Former's demo predictor (text-only main-object word
    0.080): not for want of steerability (8 free soft
    prompts per caption, fitted by reconstruction, make it say the main object at its first
    mention, teacher-forced 0.09 -> 1.00), nor its embeddings' scale, but because the
    predictor's 64-wide code carried only one attribute of the scene, whichever the LM
    rewarded first, here the colour (a ridge probe of the code: shape 0.26, colour 0.85);
    twice as wide with 4 heads it carries both (``eval.demo_captioning``, text-only 0.770). The
    LM's own training stays float32: bf16 autocast makes its step 1.54x faster (3000-token
    vocabulary), but at 2000 steps seed 0 had the colour at 0.27; with the 1536-token
    vocabulary (2026-12-07, the Intel CPU with AMX, 237 s of training against float32's
    273 s) seed 0 ended at 1.00 / 0.12 / 0.98 / 0.98, the colour never learnt (0.10-0.19 at
    every probe from step 400 on), where float32 learns all four.

    A run is reproducible bit for bit given its seed and thread setting (checked under load
    too), but ``torch.set_num_threads(2)`` and torch's default of 2 threads sum in other
    orders, so an experiment that sets the thread count is another draw than the demo's LM."""

    steps: int = 2000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    # An upper bound (BPE stops when the corpus has no more merges). 1536 holds the corpus's
    # words as whole tokens as well as 3000 did (tokens per epoch +0.08 %) with a step 1.47x
    # faster: 2000 steps cost what 1360 did, and within them every facet is learnt.
    vocab_size: int = 1536
    n_captions: int = 3000
    seed: int = 0
    lr: float = 3e-3
    batch_tokens: int = 4096  # padded tokens per optimiser step
    row_tokens: int = 320  # a batch's prompts go into rows of at most this (regroup)
    answer_weight: float = 16.0  # loss weight of answer tokens relative to all other tokens
    sketches: int = 2  # scene sketches per caption (short sentences asked every facet)
    prefixed: int = 2  # caption openings per sample that follow a sketch of their scene
    probe_n: int = 0  # held-out captions for a facet probe before and after training; 0: none
    probe_every: int = 0  # with probe_n: also probe every this many steps (training_log.json)
    overwrite: bool = False

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(f"tiny-llm: {what}")

        need(0 <= self.steps <= 10_000_000, f"steps must be in 0..10000000, got {self.steps}")
        need(1 <= self.num_layers <= 64, f"num_layers must be in 1..64, got {self.num_layers}")
        need(1 <= self.num_heads <= 64, f"num_heads must be in 1..64, got {self.num_heads}")
        need(
            1 <= self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
            f"num_kv_heads must divide num_heads ({self.num_heads}), got {self.num_kv_heads}",
        )
        need(
            8 <= self.hidden_size <= 8192 and self.hidden_size % (2 * self.num_heads) == 0,
            f"hidden_size must be in 8..8192 and a multiple of 2 x num_heads ({2 * self.num_heads}; "
            f"rotary embeddings need an even head size), got {self.hidden_size}",
        )
        need(
            1 <= self.intermediate_size <= 65536,
            f"intermediate_size must be in 1..65536, got {self.intermediate_size}",
        )
        need(
            300 <= self.vocab_size <= 100_000,
            f"vocab_size must be in 300..100000 (256 bytes + special tokens + merges), got {self.vocab_size}",
        )
        need(
            1 <= self.n_captions <= 10_000_000,
            f"n_captions must be in 1..10000000, got {self.n_captions}",
        )
        need(0 < self.lr <= 1.0, f"lr must be in (0, 1], got {self.lr}")
        need(
            16 <= self.row_tokens <= 100_000,
            f"row_tokens must be in 16..100000, got {self.row_tokens}",
        )
        need(
            256 <= self.batch_tokens <= 10_000_000,
            f"batch_tokens must be in 256..10000000, got {self.batch_tokens}",
        )
        need(
            0 <= self.answer_weight <= 1000,
            f"answer_weight must be in 0..1000, got {self.answer_weight}",
        )
        need(0 <= self.sketches <= 100, f"sketches must be in 0..100, got {self.sketches}")
        need(0 <= self.prefixed <= 100, f"prefixed must be in 0..100, got {self.prefixed}")
        need(
            0 <= self.probe_every <= 10_000_000,
            f"probe_every must be in 0..10000000, got {self.probe_every}",
        )
        need(
            self.probe_every == 0 or self.probe_n > 0,
            "probe_every needs held-out captions to probe: set probe_n (--probe N) too",
        )
        need(
            self.probe_n == 0 or 4 <= self.probe_n <= 100_000,
            f"probe_n must be 0 (no probe) or in 4..100000, got {self.probe_n}",
        )


@dataclass
class TinyLLMReport:
    out: Path
    steps: int
    initial_loss: float | None  # mean next-token loss on held-out captions; None when steps=0
    final_loss: float | None
    seconds: float
    n_params: int


# --- data -------------------------------------------------------------------------------


def _synth_samples(n: int, seed: int, start: int = 0) -> list:
    """``n`` synthetic samples (caption, short_caption, long_caption, answers)."""
    return list(iter_samples(n, seed=seed, start=start))


def _prompt_groups(sample) -> list[tuple[str, str, dict[str, str]]]:
    """The recipes' three prompt groups of one sample: (prefix, cleaned caption, facets)."""
    return [
        (SHORT_PREFIX, clean_caption(sample.caption), RAW_FACETS),
        (SHORT_PREFIX, clean_caption(sample.short_caption), SHORT_FACETS),
        (LONG_PREFIX, clean_caption(sample.long_caption), LONG_FACETS),
    ]


# Scene sketches: one short sentence holding every facet's answer, asked all 7 long facets.
# The answer sits among a handful of words instead of ~250, so the model learns early which
# kind of word each facet asks for (the gradient to attend to it is not diluted over a long
# caption). Half of them are plain (the main object first); the other half name the objects
# in either order, told apart by their size words, sometimes beside the background and the
# extra object's colour and shape: the model cannot answer "the main object's colour" with
# "the first colour", it has to find the colour bound to the main object, as in long captions.
# No sketch starts with an answer word: the first word of a caption has no space before it,
# so it would be a different token from the answer (ANSWER_SPACE).
SKETCH_TEMPLATES = (
    "a {main} {rel} {minor}, {mood} mood.",
    "a {mood} picture of a {main} {rel} {minor}.",
    "a photo of a {main} {rel} {minor} in a {mood} mood.",
    "a {mood} scene: a {main} {rel} {minor}.",
)
RICH_SKETCH_TEMPLATES = (
    "{scene}, {mood} mood.",
    "a {mood} picture of {scene}.",
    "a photo of {scene} in a {mood} mood.",
    "a {mood} scene: {scene}.",
)
RICH_SKETCH_SHARE = 0.5
_INVERSE = {"above": "below", "below": "above", "beside": "beside", "overlapping": "overlapping"}


def _sketch_caption(sample, rng: random.Random) -> str:
    if rng.random() < RICH_SKETCH_SHARE:
        return _rich_sketch_caption(sample, rng)
    a = sample.answers
    main = f"{rng.choice(['', 'large ', 'huge '])}{a['main_characteristic']} {a['main_object']}"
    if a["action"] == "alone":
        rel, minor = "alone", ""
    else:
        rel, minor = a["action"], f"a small {a['minor_characteristic']} {a['minor_object']}"
    text = rng.choice(SKETCH_TEMPLATES).format(
        main=main, rel=rel, minor=minor, mood=a["atmosphere"]
    )
    return " ".join(text.replace(" ,", ",").replace(" .", ".").split())


def _rich_sketch_caption(sample, rng: random.Random) -> str:
    a, at = sample.answers, sample.attributes
    main = f"{at['main_size']} {a['main_characteristic']} {a['main_object']}"
    minor = f"{at['minor_size']} {a['minor_characteristic']} {a['minor_object']}"
    if a["action"] == "alone":
        scene = f"a {main} alone"
    elif rng.random() < 0.5:
        scene = f"a {main} {a['action']} a {minor}"
    else:  # the minor object first: "a tiny blue heart above a large orange square"
        scene = f"a {minor} {_INVERSE[a['action']]} a {main}"
    if at["extra_shape"] != "nothing" and rng.random() < 0.5:
        scene += f" and a tiny {at['extra_color']} {at['extra_shape']} in a corner"
    if rng.random() < 0.5:
        scene += f" on a {at['background']} background"
    return rng.choice(RICH_SKETCH_TEMPLATES).format(scene=scene, mood=a["atmosphere"])


def _zero_shot_caption(sample, rng: random.Random) -> str:
    template = rng.choice(ZERO_SHOT_TEMPLATES)
    return template.format(
        obj=sample.answers["main_object"], char=sample.answers["main_characteristic"]
    )


def _tokenizer_texts(samples: Sequence) -> Iterable[str]:
    """Everything the tokenizer will see, each piece as it is tokenized later (alone)."""
    prompt_pieces = [LONG_PREFIX, SHORT_PREFIX, CONTEXT_SUFFIX, *LONG_FACETS.values()]
    templates = [re.sub(r"\{\w+\}", "", t) for t in ZERO_SHOT_TEMPLATES]
    templates += [re.sub(r"\{\w+\}", "", t) for t in SKETCH_TEMPLATES + RICH_SKETCH_TEMPLATES]
    for s in samples:
        yield from (
            clean_caption(s.caption),
            clean_caption(s.short_caption),
            clean_caption(s.long_caption),
        )
        # Once per caption, like in training, so prompt words get merged into whole tokens.
        yield from prompt_pieces
        yield from templates
        yield from (f'{ANSWER_SPACE}{a}"' for a in s.answers.values())


def train_tokenizer(samples: Sequence, vocab_size: int):
    """A byte-level BPE tokenizer (any Unicode text tokenizes, nothing is unknown) whose
    ``tok(text, add_special_tokens=False)`` gives plain ids and ``add_special_tokens=True``
    prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS]  # ids 0, 1, 2
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tk.train_from_iterator(_tokenizer_texts(samples), trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=2048
    )


@dataclass(frozen=True)
class PackedItem:
    """Token ids packed for one forward pass, with what every position is trained to predict.

    ``segment`` and ``position`` follow ``embed.packing``: segment 0 is a context, k > 0 its
    k-th facet, and positions restart after the context for every facet. ``item`` numbers the
    prompts joined into one row (``join_items``); attention never crosses items. ``target[i]``
    is the token position i predicts in its own standalone sequence (IGNORE for none) and
    ``weight[i]`` that prediction's loss weight.
    """

    ids: tuple[int, ...]
    item: tuple[int, ...]
    segment: tuple[int, ...]
    position: tuple[int, ...]
    target: tuple[int, ...]
    weight: tuple[float, ...]


def pack_prompt(
    context: Sequence[int],
    facets: Sequence[Sequence[int]] = (),
    answers: Sequence[Sequence[int]] = (),
    answer_weight: float = 1.0,
) -> PackedItem:
    """Pack ``context`` and facet segments ``facet_k + answer_k``; answers may be empty (probe).

    Targets inside the context are the next context token; the context's last token predicts
    the first facet's first token; facet tokens predict the next token of their own segment.
    Tokens of an answer are predicted with weight ``answer_weight`` (the first one from the
    facet's last token, exactly the position whose hidden state is the facet embedding).
    """
    c = len(context)
    ids, seg, pos = list(context), [0] * c, list(range(c))
    tgt = list(context[1:]) + [facets[0][0] if facets else IGNORE]
    wt = [1.0] * c
    for k, facet in enumerate(facets, start=1):
        answer = list(answers[k - 1]) if answers else []
        segment = list(facet) + answer
        ids += segment
        seg += [k] * len(segment)
        pos += range(c, c + len(segment))
        tgt += segment[1:] + [IGNORE]
        wt += [1.0] * (len(facet) - 1) + [answer_weight] * len(answer) + [0.0]
    wt = [w if t != IGNORE else 0.0 for w, t in zip(wt, tgt, strict=True)]
    return PackedItem(tuple(ids), (0,) * len(ids), tuple(seg), tuple(pos), tuple(tgt), tuple(wt))


def join_items(items: Sequence[PackedItem]) -> PackedItem:
    """Several prompts in one row, each attending only to itself (a block-diagonal mask)."""
    return PackedItem(
        ids=tuple(t for it in items for t in it.ids),
        item=tuple(n for n, it in enumerate(items) for _ in it.ids),
        segment=tuple(s for it in items for s in it.segment),
        position=tuple(p for it in items for p in it.position),
        target=tuple(t for it in items for t in it.target),
        weight=tuple(w for it in items for w in it.weight),
    )


def regroup(rows: Sequence[PackedItem], cap: int) -> list[PackedItem]:
    """The prompts of ``rows`` regrouped into rows of at most ``cap`` tokens (a longer prompt
    gets a row of its own), first fit by decreasing length; each row's prompts keep their
    order.

    Why: attention costs the square of a row's length, and a prompt attends only to itself,
    so the same tokens in shorter rows train the same loss for less. A training sample is ~880
    tokens of ~9 prompts of up to ~320; in rows of 320 its attention costs about a third."""
    names = [f.name for f in fields(PackedItem)]
    prompts = []
    for row in rows:
        cuts = [i for i in range(1, len(row.item)) if row.item[i] != row.item[i - 1]]
        for a, b in zip([0, *cuts], [*cuts, len(row.item)], strict=True):
            prompts.append(PackedItem(*(getattr(row, n)[a:b] for n in names)))
    bins: list[list[int]] = []
    sizes: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids)):  # longest first
        n = len(prompts[i].ids)
        j = next((j for j, size in enumerate(sizes) if size + n <= cap), None)
        if j is None:
            bins.append([i])
            sizes.append(n)
        else:
            bins[j].append(i)
            sizes[j] += n
    return [join_items([prompts[i] for i in sorted(b)]) for b in bins]


def attention_allowed(item: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L, L]: query i may attend key j iff j <= i, both belong to the same prompt,
    and j is in that prompt's context or in i's own facet (``embed.packing.facet_allowed``
    with several prompts per row). Padding (segment -1) sees only itself, so no softmax row
    is empty."""
    length = segment.shape[-1]
    idx = torch.arange(length)
    causal = idx[None, :] <= idx[:, None]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    same_item = item[:, :, None] == item[:, None, :]
    allowed = causal & same_item & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0) & (q_seg >= 0)
    return allowed | torch.eye(length, dtype=torch.bool)


class _Encoder:
    """Token ids of prompt pieces, each tokenized alone as facetclip does (BOS added by us)."""

    def __init__(self, tok):
        self.tok = tok
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def context(self, prefix: str, caption: str) -> list[int]:
        return [self.bos] + self(prefix) + self(caption)[:MAX_CAPTION_TOKENS] + self(CONTEXT_SUFFIX)


def training_rows(
    samples: Sequence,
    enc: _Encoder,
    answer_weight: float,
    seed: int,
    sketches: int = 1,
    prefixed: int = 0,
) -> list[PackedItem]:
    """One row per sample, joining its prompts: the raw, short and long prompt groups with
    every facet answered, a zero-shot class prompt answered with the main object (and, when it
    names a colour, with that colour too), ``sketches`` scene sketches asked every long facet,
    one bare caption, and ``prefixed`` prefixed documents (a sketch, then the opening of a
    caption of the same scene, attending to it). Keeping a sample's prompts together makes
    every batch a mix of all kinds (batches of one kind only, e.g. all alt-texts, make the
    loss and the updates jumpy)."""
    rng = random.Random(seed)

    def answer(word: str) -> list[int]:  # the one-word answer, its closing quote, then EOS
        return enc(ANSWER_SPACE + word + '"') + [enc.eos]

    rows = []
    for s in samples:
        items = []
        for prefix, caption, facets in _prompt_groups(s):
            answers = [answer(s.answers[ANSWER_OF[name]]) for name in facets]
            facet_ids = [enc(text) for text in facets.values()]
            items.append(
                pack_prompt(enc.context(prefix, caption), facet_ids, answers, answer_weight)
            )
        zs_caption = _zero_shot_caption(s, rng)
        zs_facets = {**RAW_FACETS}
        if s.answers["main_characteristic"] in zs_caption.split():
            zs_facets |= {k: LONG_FACETS[k] for k in ("main_object", "main_characteristic")}
        answers = [answer(s.answers[ANSWER_OF[name]]) for name in zs_facets]
        zs_context = enc.context(SHORT_PREFIX, clean_caption(zs_caption))
        items.append(
            pack_prompt(zs_context, [enc(t) for t in zs_facets.values()], answers, answer_weight)
        )
        answers = [answer(s.answers[name]) for name in LONG_FACETS]
        facet_ids = [enc(text) for text in LONG_FACETS.values()]
        for _ in range(sketches):
            sketch_context = enc.context(SHORT_PREFIX, clean_caption(_sketch_caption(s, rng)))
            items.append(pack_prompt(sketch_context, facet_ids, answers, answer_weight))
        bare = rng.choice([s.caption, s.short_caption, s.long_caption])
        items.append(pack_prompt([enc.bos] + enc(bare)[:MAX_CAPTION_TOKENS] + [enc.eos]))
        for _ in range(prefixed):
            sketch = [enc.bos] + enc(clean_caption(_sketch_caption(s, rng))) + [enc.eos]
            text = enc(rng.choice([s.short_caption, s.long_caption]))
            end = [enc.eos] if len(text) <= PREFIXED_TOKENS else []  # cut documents have none
            items.append(pack_prompt(sketch + [enc.bos] + text[:PREFIXED_TOKENS] + end))
        rows.append(join_items(items))
    return rows


def collate(rows: Sequence[PackedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into [B, L] tensors plus the [B, 1, L, L] additive attention mask
    (0 where ``attention_allowed``, the float minimum elsewhere), the custom-mask form every
    transformers attention implementation accepts."""
    length = max(len(r.ids) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
        "item": torch.full((len(rows), length), -1, dtype=torch.long),
        "segment": torch.full((len(rows), length), -1, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), length), dtype=torch.long),
        "target": torch.full((len(rows), length), IGNORE, dtype=torch.long),
        "weight": torch.zeros((len(rows), length)),
    }
    for b, r in enumerate(rows):
        n = len(r.ids)
        batch["input_ids"][b, :n] = torch.tensor(r.ids)
        batch["item"][b, :n] = torch.tensor(r.item)
        batch["segment"][b, :n] = torch.tensor(r.segment)
        batch["position_ids"][b, :n] = torch.tensor(r.position)
        batch["target"][b, :n] = torch.tensor(r.target)
        batch["weight"][b, :n] = torch.tensor(r.weight)
    allowed = attention_allowed(batch["item"], batch["segment"])
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    batch["attention_mask"] = mask[:, None]
    return batch


# --- model and training -------------------------------------------------------------------


def make_model(cfg: TinyLLMConfig, tok):
    """A randomly initialised Llama sized by ``cfg``, in float32 (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] next-token cross-entropy of every position against its own target (0 where none)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(batch["weight"])


@torch.no_grad()
def heldout_loss(model, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(mean loss over all predicted tokens, mean loss over answer tokens) on fixed batches."""
    model.eval()
    total = answer = n_total = n_answer = 0.0
    for batch in batches:
        ce = token_losses(model, batch)
        predicted = batch["target"] != IGNORE
        is_answer = batch["weight"] > 1.0  # held-out items are built with answer_weight 2
        total += ce[predicted].sum().item()
        n_total += predicted.sum().item()
        answer += ce[is_answer].sum().item()
        n_answer += is_answer.sum().item()
    model.train()
    return total / max(n_total, 1), answer / max(n_answer, 1)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"tiny-llm: {out} exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"tiny-llm: {out} is not empty; pass --overwrite to replace its model")


def build_tiny_llm(out: str | Path, cfg: TinyLLMConfig, progress: bool = True) -> TinyLLMReport:
    """Train the tokenizer, initialise (and unless ``cfg.steps == 0`` pre-train) a small Llama,
    and save both to ``out`` in Hugging Face format with ``training_log.json``."""
    from rich.console import Console

    cfg.validate()
    out = Path(out)
    _check_out(out, cfg.overwrite)
    console = Console(quiet=not progress)
    t0 = time.perf_counter()

    samples = _synth_samples(cfg.n_captions, cfg.seed)
    tok = train_tokenizer(samples, cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, tok)
    n_params = model.num_parameters()
    console.print(
        f"tiny-llm: vocab {len(tok)}, {n_params / 1e6:.2f}M parameters, {cfg.steps} steps"
    )

    log: dict = {
        "config": asdict(cfg),
        "vocab_size": len(tok),
        "n_params": n_params,
        "steps": cfg.steps,
    }
    initial_loss = final_loss = None
    if cfg.steps > 0 or cfg.probe_n > 0:
        probe_samples = _synth_samples(
            cfg.probe_n, cfg.seed, start=cfg.n_captions + HELDOUT_CAPTIONS
        )
        if cfg.probe_n:
            log["probe_untrained"] = facet_probe(model, tok, probe_samples)
    if cfg.steps > 0:
        probe = (lambda: facet_probe(model, tok, probe_samples)) if cfg.probe_n else None
        train_log = train(model, tok, samples, cfg, console, probe=probe)
        initial_loss, final_loss = train_log["initial_loss"], train_log["final_loss"]
        log.update(train_log)
        if cfg.probe_n:
            log["probe_trained"] = facet_probe(model, tok, probe_samples)
    if cfg.probe_n:
        before, after = log["probe_untrained"], log.get("probe_trained")
        scores = [
            f"{f} {v:.2f}" + (f" -> {after[f]:.2f}" if after else "") for f, v in before.items()
        ]
        console.print(
            f"tiny-llm: facet probe (nearest centroid, {cfg.probe_n} held-out long captions; "
            f"untrained{' -> trained' if after else ''}): {', '.join(scores)}"
        )
    log["initial_loss"], log["final_loss"] = initial_loss, final_loss

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    seconds = time.perf_counter() - t0
    log["seconds"] = round(seconds, 2)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    console.print(f"tiny-llm: saved to {out} in {seconds:.0f} s")
    return TinyLLMReport(out, cfg.steps, initial_loss, final_loss, seconds, n_params)


def train(model, tok, samples: Sequence, cfg: TinyLLMConfig, console, probe=None) -> dict:
    """AdamW next-token training on length-bucketed batches of packed prompts. Returns the
    held-out losses before and after, the training time and a coarse training-loss curve; with
    ``probe`` (a function returning facet accuracies) and ``cfg.probe_every``, also the probe
    every that many steps (``probe_curve``; its time is not training time): each facet is
    learnt suddenly, and the curve shows when."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    enc = _Encoder(tok)
    rows = training_rows(samples, enc, cfg.answer_weight, cfg.seed, cfg.sketches, cfg.prefixed)
    heldout = training_rows(
        _synth_samples(HELDOUT_CAPTIONS, cfg.seed, start=cfg.n_captions), enc, 2.0, cfg.seed + 1
    )
    heldout_batches = [
        collate(regroup([heldout[i] for i in b], cfg.row_tokens), tok.pad_token_id)
        for b in token_budget_batches([len(it.ids) for it in heldout], cfg.batch_tokens)
    ]
    # Length bucketing keeps padding small; the order of the buckets is shuffled every epoch.
    # A bucket holds whole samples (every kind of prompt in each batch); their prompts are
    # regrouped into rows of at most row_tokens (regroup).
    buckets = token_budget_batches([len(r.ids) for r in rows], cfg.batch_tokens)
    gen = torch.Generator().manual_seed(cfg.seed)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    initial, initial_answer = heldout_loss(model, heldout_batches)
    console.print(
        f"tiny-llm: initial held-out loss {initial:.3f} (answer tokens {initial_answer:.3f})"
    )

    t0 = time.perf_counter()
    curve: list[tuple[int, float]] = []
    probe_curve: list[tuple[int, dict[str, float]]] = []
    probe_seconds = 0.0
    order: list[int] = []
    columns = (
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    model.train()
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=cfg.steps, loss="-")
        running = None
        for step in range(cfg.steps):
            if not order:
                order = torch.randperm(len(buckets), generator=gen).tolist()
            bucket = [rows[i] for i in buckets[order.pop()]]
            batch = collate(regroup(bucket, cfg.row_tokens), tok.pad_token_id)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.steps, cfg.lr)
            ce = token_losses(model, batch)
            # Weighted mean: answer tokens count `answer_weight` times, padding not at all.
            loss = (ce * batch["weight"]).sum() / batch["weight"].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if step % 10 == 0 or step == cfg.steps - 1:
                curve.append((step, round(loss.item(), 4)))
            done = step + 1
            # (the probe after the last step is build_tiny_llm's probe_trained)
            if probe and cfg.probe_every and done % cfg.probe_every == 0 and done < cfg.steps:
                t_probe = time.perf_counter()
                probe_curve.append((done, probe()))  # facet_probe puts the model back in train()
                probe_seconds += time.perf_counter() - t_probe
                scores = ", ".join(f"{f} {v:.2f}" for f, v in probe_curve[-1][1].items())
                console.print(f"tiny-llm: facet probe at step {done}: {scores}")
            bar.update(task, advance=1, loss=f"{running:.3f}")
    seconds = time.perf_counter() - t0 - probe_seconds
    final, final_answer = heldout_loss(model, heldout_batches)
    console.print(f"tiny-llm: final held-out loss {final:.3f} (answer tokens {final_answer:.3f})")
    return {
        "initial_loss": round(initial, 4),
        "final_loss": round(final, 4),
        "initial_answer_loss": round(initial_answer, 4),
        "final_answer_loss": round(final_answer, 4),
        "train_seconds": round(seconds, 2),
        "train_rows": len(rows),
        "loss_curve": curve,
        **({"probe_curve": probe_curve} if probe_curve else {}),
    }


# --- probe ---------------------------------------------------------------------------------


@torch.no_grad()
def facet_vectors(model, tok, samples: Sequence, facets: Sequence[str]) -> torch.Tensor:
    """[len(facets), N, D] last-token hidden states (after the final norm) of
    ``BOS + LONG_PREFIX + long caption + CONTEXT_SUFFIX + facet`` for every sample."""
    enc = _Encoder(tok)
    facet_ids = [enc(LONG_FACETS[f]) for f in facets]
    items = [
        pack_prompt(enc.context(LONG_PREFIX, clean_caption(s.long_caption)), facet_ids)
        for s in samples
    ]
    model.eval()
    vectors = torch.zeros(len(facets), len(samples), model.config.hidden_size)
    for bucket in token_budget_batches([len(it.ids) for it in items], 8192):
        batch = collate([items[i] for i in bucket], tok.pad_token_id)
        hidden = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state
        for row, i in enumerate(bucket):
            # Last token of facet k = last position whose segment is k.
            seg = batch["segment"][row]
            for k in range(len(facets)):
                last = int((seg == k + 1).nonzero().max())
                vectors[k, i] = hidden[row, last]
    model.train()
    return vectors


def nearest_centroid_accuracy(vectors: torch.Tensor, labels: Sequence[str]) -> float:
    """Fit class centroids on the first half, classify the second half by cosine similarity.
    Vectors are centred on the fitting half's mean first (LLM states share a large common
    direction that would otherwise dominate every cosine)."""
    half = len(labels) // 2
    mean = vectors[:half].mean(0)
    x = F.normalize(vectors - mean, dim=-1)
    classes = sorted(set(labels[:half]))
    centroids = torch.stack(
        [
            F.normalize(x[:half][[lab == c for lab in labels[:half]]].mean(0), dim=-1)
            for c in classes
        ]
    )
    predicted = (x[half:] @ centroids.T).argmax(-1).tolist()
    return sum(classes[p] == lab for p, lab in zip(predicted, labels[half:], strict=True)) / max(
        1, len(labels) - half
    )


def facet_probe(
    model, tok, samples: Sequence, facets: Sequence[str] = PROBE_FACETS
) -> dict[str, float]:
    """Nearest-centroid accuracy of each facet's vectors at predicting that facet's answer."""
    vectors = facet_vectors(model, tok, samples, facets)
    return {
        f: round(nearest_centroid_accuracy(vectors[k], [s.answers[f] for s in samples]), 4)
        for k, f in enumerate(facets)
    }


def probe_facets(
    model_dir: str | Path, n: int = 400, seed: int = 0, start: int = 1_000_000
) -> dict[str, float]:
    """How well a saved model's facet vectors separate held-out samples by their answers.

    Nearest-centroid accuracy (centroids from the first n/2 samples, scored on the rest) of
    the main object, main characteristic, minor object and atmosphere facets, on synthetic
    samples ``start .. start + n`` (beyond any training range) of ``seed``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if n < 4:
        raise InputError(f"probe: n must be at least 4, got {n}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return facet_probe(model, tok, _synth_samples(n, seed, start=start))


def render_tiny_llm(r: TinyLLMReport) -> str:
    """What `facetclip tiny-llm` prints."""
    lines = [f"wrote model to [bold]{r.out}[/] ({r.n_params:,} parameters, {r.seconds:.0f} s)"]
    if r.initial_loss is not None:
        lines.append(
            f"pre-training loss: {r.initial_loss:.3f} -> {r.final_loss:.3f} over {r.steps} steps"
        )
    return "\n".join(lines)
