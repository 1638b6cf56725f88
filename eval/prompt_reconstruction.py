"""Does a P-Former predictor's prompt make the frozen LLM say the caption? (issue 14's
text-only claim). A rerunnable measurement on held-out captions, for any predictor and LLM.

For each held-out caption c (the predictor's clean-up and truncation applied), the frozen LLM
reads ``[prompt] + BOS + c + EOS`` under four conditions:

- ``predicted``: the predictor's N prompts of c itself;
- ``shuffled``: the predicted prompts of another held-out caption (c's neighbour in the list):
  prompts that are well-formed but about something else;
- ``random``: N Gaussian vectors with the per-dimension mean and std of the LLM's
  input-embedding matrix (seeded);
- ``none``: no prompt at all (BOS + c).

Measured per condition: teacher-forced token accuracy and cross-entropy on c's tokens (EOS
excluded); teacher-forced accuracy at the one position where c first names its main object
(the content the prompt must carry: boilerplate tokens are predictable without it); and, from
greedy decoding of ``[prompt] + BOS`` alone, whether the first shape word generated is c's
true main object ("exact main-object word"). Chance for the last two is about 1 / number of
shapes; the ``none`` condition shows the LLM's own prior.

    >>> from eval.prompt_reconstruction import reconstruction_check
    >>> r = reconstruction_check("runs/pf", "data/synth/eval/retrieval/captions.parquet",
    ...                          "data/synth/labels.parquet")            # doctest: +SKIP
    >>> r.conditions["predicted"]["token_acc"], r.conditions["random"]["token_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONDITIONS = ("predicted", "shuffled", "random", "none")


@dataclass
class ReconstructionReport:
    predictor: str
    llm: str
    captions: int
    seed: int
    max_caption_tokens: int
    n_prompts: int
    chance_main_object: float  # 1 / number of shape words
    main_object_in_reference: float  # share of truncated references that name the main object
    conditions: dict[str, dict] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # a few greedy decodes per condition
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown: one row per condition."""
        lines = [
            "| prompt | token accuracy | cross-entropy | main-object token (teacher-forced) "
            "| main-object word (greedy) |",
            "|---|---|---|---|---|",
        ]
        for name, c in self.conditions.items():
            lines.append(
                f"| {name} | {c['token_acc']:.3f} | {c['loss']:.3f} | "
                f"{c['main_object_token_acc']:.3f} | {c['main_object_acc']:.3f} |"
            )
        lines.append(f"\nchance for the main-object word: {self.chance_main_object:.3f}; "
                     f"references naming it within {self.max_caption_tokens} tokens: "
                     f"{self.main_object_in_reference:.3f}")  # fmt: skip
        return "\n".join(lines)


def first_shape(text: str, shapes: tuple[str, ...]) -> str | None:
    """The first whole word of ``text`` that is a shape name (plural 's' allowed)."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in shapes or (word.endswith("s") and word[:-1] in shapes):
            return word if word in shapes else word[:-1]
    return None


def main_object_position(tok, caption_ids: list[int], word: str) -> int | None:
    """Index in ``caption_ids`` of the first token that begins the word ``word``."""
    for i, t in enumerate(caption_ids):
        piece = tok.decode([t]).strip().lower()
        if (
            piece
            and word.startswith(piece)
            and tok.decode(caption_ids[i : i + 4]).strip().lower().startswith(word)
        ):
            return i
    return None


def reconstruction_check(
    predictor: str | Path,
    captions: str | Path,
    labels: str | Path,
    column: str = "long_caption",
    n: int = 200,
    seed: int = 0,
    llm: str | Path | None = None,
    batch_size: int = 50,
    n_examples: int = 3,
) -> ReconstructionReport:
    """Measure the predictor at ``predictor`` on the first ``n`` rows of ``captions`` (a
    Parquet table with ``key`` and ``column``), whose true main objects are in ``labels``
    (synth's labels.parquet: ``key``, ``main_object``). ``llm`` defaults to the predictor's."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embed.pformer_model import (
        IGNORE,
        llm_target_ids,
        load_predictor,
        pad_batch,
        prompted_logits,
        shifted_targets,
    )
    from eval.synth import SHAPES
    from store.errors import InputError

    t0 = time.perf_counter()
    pf = load_predictor(predictor)
    llm_path = str(llm or pf.info["llm"])
    tok = AutoTokenizer.from_pretrained(llm_path)
    model = AutoModelForCausalLM.from_pretrained(llm_path).eval()
    table = pq.read_table(captions, columns=["key", column]).slice(0, n)
    keys, texts = table.column("key").to_pylist(), table.column(column).to_pylist()
    truth_table = pq.read_table(labels, columns=["key", "main_object"])
    truth_of = dict(zip(truth_table.column("key").to_pylist(),
                        truth_table.column("main_object").to_pylist(), strict=True))  # fmt: skip
    missing = [k for k in keys if k not in truth_of]
    if missing:
        raise InputError(f"{labels} has no main_object for keys {missing[:5]}")
    truth = [truth_of[k] for k in keys]

    from embed.pformer_model import caption_token_ids

    cfg = pf.cfg
    caption_ids = caption_token_ids(tok, texts, cfg.cleanup, cfg.max_caption_tokens)[0]
    references = [tok.decode(c) for c in caption_ids]
    predicted = pf.predict_prompts(texts)
    emb = model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(seed)
    random = emb.mean(0) + emb.std(0) * torch.randn(
        (len(texts), cfg.n_prompts, emb.shape[1]), generator=gen
    )
    prompts = {
        "predicted": predicted,
        "shuffled": predicted.roll(1, dims=0),
        "random": random,
        "none": predicted[:, :0],
    }
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    # Where each caption first names its main object (an index into its caption ids).
    positions = [main_object_position(tok, c, t) for c, t in zip(caption_ids, truth, strict=True)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    report = ReconstructionReport(
        predictor=str(pf.path), llm=llm_path, captions=len(texts), seed=seed,
        max_caption_tokens=cfg.max_caption_tokens, n_prompts=cfg.n_prompts,
        chance_main_object=1 / len(SHAPES),
        main_object_in_reference=float(np.mean(
            [first_shape(r, SHAPES) == t for r, t in zip(references, truth, strict=True)])),
    )  # fmt: skip
    with torch.no_grad():
        for name in CONDITIONS:
            correct = total = 0
            loss_sum, hits, decoded, slot_hits, slots = 0.0, 0, [], 0, 0
            for s in range(0, len(texts), batch_size):
                p = prompts[name][s : s + batch_size]
                # Teacher forcing: the caption's tokens (EOS excluded from the accuracy).
                ids, mask = pad_batch(llm_target_ids(tok, caption_ids[s : s + batch_size]), pad)
                logits = prompted_logits(model, p, ids, mask).float()
                targets = shifted_targets(ids, mask)
                if tok.eos_token_id is not None:
                    targets = targets.masked_fill(targets == tok.eos_token_id, IGNORE)
                keep = targets != IGNORE
                loss_sum += float(torch.nn.functional.cross_entropy(
                    logits[keep], targets[keep], reduction="sum"))  # fmt: skip
                pred = logits.argmax(-1)
                correct += int((pred[keep] == targets[keep]).sum())
                total += int(keep.sum())
                for j, pos in enumerate(positions[s : s + batch_size]):
                    if pos is not None:  # targets[j, k] is input token k + 1: the caption's
                        k = pos + len(bos) - 1  # token pos sits at input index pos + len(bos)
                        slot_hits += int(pred[j, k] == targets[j, k])
                        slots += 1
                # Greedy decoding from the prompt and BOS alone (all inputs the same length).
                start = torch.tensor([bos] * len(p), dtype=torch.long)
                x = torch.cat([p, model.get_input_embeddings()(start)], dim=1)
                out = model.generate(
                    inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                    max_new_tokens=cfg.max_caption_tokens + 1, do_sample=False,
                    eos_token_id=tok.eos_token_id, pad_token_id=pad,
                )  # fmt: skip
                texts_out = tok.batch_decode(out, skip_special_tokens=True)
                for j, text in enumerate(texts_out):
                    hits += first_shape(text, SHAPES) == truth[s + j]
                decoded += texts_out
            report.conditions[name] = {
                "token_acc": correct / max(1, total),
                "loss": loss_sum / max(1, total),
                "main_object_acc": hits / len(texts),
                "main_object_token_acc": slot_hits / max(1, slots),
            }
            report.examples += [
                {"condition": name, "truth": truth[i], "reference": references[i],
                 "decoded": decoded[i]} for i in range(min(n_examples, len(texts)))
            ]  # fmt: skip
    report.seconds = time.perf_counter() - t0
    return report
