"""Text and soft prompts in front of a frozen causal LLM: the one definition that stage one
(P-Former, ``embed.pformer``), stage two (``--loss caption-lm``, ``train``) and captioning
(``eval.captioning``) share, so all three tokenise a caption and feed prompts identically.

    ids = caption_token_ids(tok, texts, cleanup="flame", max_tokens=32)[0]
    ids, mask = pad_batch(llm_target_ids(tok, ids), pad_id)      # BOS + caption + EOS
    logits = prompted_logits(llm, prompts, ids, mask)            # prompts [B, N, D] ahead
    loss = reconstruction_loss(logits, shifted_targets(ids, mask))

These are pure functions of their arguments (a tokenizer, a ``transformers`` causal LM, tensors).
They live here, on the ground floor, because embed/ and train/ may not import each other; torch
is imported inside each function, so importing this module (``clean_caption`` is used by every
recipe) stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100  # target of a position that predicts nothing


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


def caption_token_ids(
    tokenizer, texts: Sequence[str], cleanup: str, max_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """(ids truncated to ``max_tokens``, full token counts) of each caption, without special
    tokens: exactly what ``embed.tokenize.PromptTokenizer`` puts in a context's caption span
    for a recipe with no prefix or suffix, so training and ``embed`` see the same ids."""
    if not texts:
        return [], []
    cleaned = [clean_caption(t, cleanup) for t in texts]
    ids = tokenizer(cleaned, add_special_tokens=False)["input_ids"]
    return [list(i[:max_tokens]) for i in ids], [len(i) for i in ids]


def llm_target_ids(tokenizer, caption_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """What the LLM reads after the prompts: BOS (when it has one) + caption + EOS. The caption
    tokens and EOS are predicted; EOS teaches generation where a caption ends."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return [bos + list(c) + eos for c in caption_ids]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and their 0/1 mask."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def prompted_logits(
    llm, prompts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits of the frozen LLM at the positions that predict ``ids[:, 1:]``, when the N
    prompts are fed as ``inputs_embeds`` ahead of the token embeddings of ``ids``:

        inputs  = [p_1 … p_N, emb(ids_0), emb(ids_1), …]     positions 0 … N + L - 1
        returns logits at positions N … N + L - 2            [B, L - 1, V]

    Right padding of ``ids`` is masked; position ids count from 0 at p_1 either way.
    """
    import torch

    emb = llm.get_input_embeddings()(ids)
    x = torch.cat([prompts.to(emb.dtype), emb], dim=1)
    attn = torch.cat([torch.ones(prompts.shape[:2], dtype=mask.dtype, device=mask.device), mask], 1)
    n = prompts.shape[1]
    # The base model then the LM head on the caption positions only: the prompt positions'
    # logits ([B, N, V], large for a real vocabulary) are never computed.
    hidden = llm.base_model(inputs_embeds=x, attention_mask=attn).last_hidden_state
    return llm.get_output_embeddings()(hidden[:, n : n + ids.shape[1] - 1])


def shifted_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``ids[:, 1:]`` with padding set to IGNORE: what ``prompted_logits`` predicts."""
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)


def reconstruction_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every caption token (and EOS) of the batch: P-Former's
    reconstruction term, and the generative (captioning) loss of ``--loss caption-lm``."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE)  # fmt: skip
