"""The image head of the prompt losses (P-Former's alignment, BLIP-2's captioning): N learned
queries that cross-attend to the tower's patch tokens and come out as N soft prompt vectors in
the frozen LLM's input-embedding space (papers.md §3).

    head = PromptHead(in_dim=768, out_dim=2560, n_prompts=32)
    prompts = head(model.patch_tokens(images))        # [B, L, C] -> [B, 32, 2560]

A small Q-Former: every block lets the queries attend to each other, then to the patch tokens,
then an MLP (pre-norm ``nn.TransformerDecoderLayer``: self-attention, cross-attention, MLP).
The patch tokens are projected to the head's width and normalised once; the queries' output
is normalised and projected to the LLM's width, multiplied by ``out_scale`` and added to
``out_mean``: fixed buffers the trainer sets to the target prompts' spread and per-slot mean
(``store.prompts.prompt_stats``) and saves with the weights. The head thus regresses
standardised targets: what it learns is each image's deviation from the mean prompt.

Why the fixed scale: prompts live in an LLM's input-embedding space, whose values are small
(the tiny LM's P-Former prompts vary by ~0.045 around their slot means). Adam moves every
weight by about the learning rate per step whatever the loss's scale, so a projection that
must output values that small needs weights about that small, and each step jitters them by
their own size: on a toy regression (9 classes of patch tokens -> 9 prompt sets of spread
0.045, 300 AdamW steps at lr 3e-3) the head explained 5.5% of its targets' variance, and
99.7% with targets of spread 1 or with ``out_scale`` = 0.045. Stage two's prompt-align runs
showed the same: the head stayed at the mean prompt (README, P-Former).

Why the fixed mean: the slot means are many spreads away from zero, and Adam moves a bias by
about the learning rate per step, so with the scale alone the first few hundred steps went to
reaching the mean. On the demo's cached FLAME tower features (1,946 images, 300 steps, lr
1e-3), held-out R² of the prompts went 0.05 -> 0.13 with ``out_mean``, and the share of
captions naming the main shape 0.145 -> 0.415 (the text-predicted prompts themselves: 0.555).
"""

from __future__ import annotations

import torch
from torch import nn


class PromptHead(nn.Module):
    """[B, L, in_dim] patch tokens -> [B, n_prompts, out_dim] prompt vectors."""

    def __init__(
        self, in_dim: int, out_dim: int, n_prompts: int, width: int, layers: int, heads: int
    ):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width)
        self.norm_in = nn.LayerNorm(width)
        # Small random queries (BLIP-2 initialises its 32 queries with std 0.02).
        self.queries = nn.Parameter(torch.randn(n_prompts, width) * 0.02)
        block = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerDecoder(block, layers)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("out_mean", torch.zeros(n_prompts, out_dim))
        # Models saved before these buffers existed load with what they were trained with:
        # scale 1, mean 0.
        self._register_load_state_dict_pre_hook(self._default_buffers)

    @property
    def n_prompts(self) -> int:
        return self.queries.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.norm_in(self.proj_in(tokens))
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        out = self.proj_out(self.norm(self.blocks(queries, memory)))
        return self.out_mean + self.out_scale * out

    def _default_buffers(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "out_scale", torch.ones(()))
        state_dict.setdefault(prefix + "out_mean", torch.zeros_like(self.out_mean))
