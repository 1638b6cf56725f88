"""P-Former (papers.md §3, BLIText): a small text encoder that predicts, from a caption alone,
the N soft prompt vectors that make a frozen LLM reproduce the caption.

    caption ids -> encoder -> pooled code c [d]          (the [CLS] state)
                -> cls_proj: Linear(d -> N·d), reshape [N, d]
                -> pooler:   Linear(d -> d) + Tanh
                -> llm_proj: Linear(d -> D)              -> N prompts in the LLM's input space

This file holds the predictor (``PromptPredictor``), its three loss terms as pure functions,
the prompted forward pass through the frozen LLM, and saving/loading. Training is
``embed.pformer``; caching prompts is ``embed.pformer_engine``.

    >>> from embed.pformer_model import load_predictor
    >>> pf = load_predictor("runs/pf")                              # doctest: +SKIP
    >>> pf.predict_prompts(["A red star above a blue circle."]).shape  # doctest: +SKIP
    torch.Size([1, 32, 128])

The encoder is either ``own`` (a few pre-norm transformer layers over the LLM's own tokenizer,
with a learned [CLS] and [MASK] row, trained from scratch) or any Hugging Face encoder by name
(BERT as published; its [CLS] state is the code, its tokenizer reads the captions).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embed.prompts import clean_caption
from store.errors import InputError

PREDICTOR_DIR = "predictor"  # inside a `facetclip pformer` run directory
PREDICTOR_FILE = "predictor.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "facetclip-pformer/1"
IGNORE = -100  # target of a position that predicts nothing


@dataclass
class PredictorConfig:
    """The predictor's shape and the text it reads. Saved in ``predictor.json``."""

    encoder: str = "own"  # "own", or a Hugging Face encoder (name or folder)
    width: int = 256  # d: own encoder width (an HF encoder's hidden size replaces it)
    layers: int = 4  # own encoder
    heads: int = 4  # own encoder
    ffn: int = 1024  # own encoder
    dropout: float = 0.1  # own encoder (an HF encoder keeps its own config's)
    n_prompts: int = 32  # N
    proj_dim: int = 256  # contrastive projection of the code (256 as published)
    max_caption_tokens: int = 32  # caption tokens kept, in both tokenizers (32 as published)
    cleanup: str = "flame"  # caption clean-up before tokenising (embed.prompts.clean_caption)
    # Filled from the tokenizer and the LLM when a predictor is made:
    vocab_size: int = 0  # own encoder: the LLM tokenizer's size
    llm_width: int = 0  # D
    prefix_ids: list[int] = field(default_factory=list)  # around the caption ids: [CLS] ...
    suffix_ids: list[int] = field(default_factory=list)  # ... [SEP] (HF encoders)
    pad_id: int = 0
    mask_id: int = -1  # [MASK] for input masking; -1: the tokenizer has none
    encoder_config: dict = field(default_factory=dict)  # an HF encoder's config (to rebuild it)

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(f"pformer: {what}")

        need(1 <= self.n_prompts <= 1024, f"n_prompts must be in 1..1024, got {self.n_prompts}")
        need(
            1 <= self.max_caption_tokens <= 8192,
            f"max_caption_tokens must be in 1..8192, got {self.max_caption_tokens}",
        )
        need(1 <= self.proj_dim <= 8192, f"proj_dim must be in 1..8192, got {self.proj_dim}")
        if self.encoder == "own":
            need(1 <= self.layers <= 48, f"layers must be in 1..48, got {self.layers}")
            need(
                8 <= self.width <= 8192 and self.width % self.heads == 0,
                f"width must be in 8..8192 and a multiple of heads ({self.heads}), got {self.width}",
            )
            need(1 <= self.ffn <= 65536, f"ffn must be in 1..65536, got {self.ffn}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> PredictorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class OwnEncoder(nn.Module):
    """Pre-norm transformer layers over the LLM tokenizer's ids, two extra rows ([CLS] at
    ``vocab_size``, [MASK] at ``vocab_size + 1``) and learned positions; returns the [CLS]
    state. Padding keys are masked, so a caption's code does not depend on its batch-mates."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size + 2, cfg.width)
        self.positions = nn.Embedding(cfg.max_caption_tokens + 2, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, cfg.ffn, cfg.dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        # No nested-tensor fast path: the same math in training and inference.
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.dropout(self.tokens(ids) + self.positions(pos)[None])
        x = self.layers(x, src_key_padding_mask=~mask.bool())
        return self.norm(x[:, 0])


class HFEncoder(nn.Module):
    """A Hugging Face encoder; its first token's last hidden state is the code ([CLS])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


class PromptPredictor(nn.Module):
    """Caption ids -> pooled code -> N prompt vectors; plus the contrastive projection."""

    def __init__(self, cfg: PredictorConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if encoder is None:
            encoder = OwnEncoder(cfg) if cfg.encoder == "own" else _hf_encoder_from_config(cfg)
        self.encoder = encoder
        d, n = cfg.width, cfg.n_prompts
        # The head as published (BLIText pformer_opt.py): one Linear to N·d, a Linear+Tanh
        # "pooler" per prompt, and a projection into the LLM's input-embedding width.
        self.cls_proj = nn.Linear(d, n * d)
        self.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.llm_proj = nn.Linear(d, cfg.llm_width)
        self.text_proj = nn.Linear(d, cfg.proj_dim)
        # Contrastive temperature, learned from 0.07 and kept in [0.001, 0.5] as in BLIP-2.
        self.temp = nn.Parameter(torch.tensor(0.07))

    @property
    def device(self) -> torch.device:
        return self.cls_proj.weight.device

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] encoder ids (from ``encoder_batch``) -> [B, d] pooled codes."""
        return self.encoder(ids, mask)

    def expand(self, code: torch.Tensor) -> torch.Tensor:
        """[B, d] codes -> [B, N, D] prompt vectors (store.prompts.expand_codes in numpy)."""
        h = self.cls_proj(code).reshape(code.shape[0], self.cfg.n_prompts, self.cfg.width)
        return self.llm_proj(self.pooler(h))

    def project(self, code: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, proj_dim] unit vectors for the contrastive term."""
        return F.normalize(self.text_proj(code), dim=-1)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        view_ids: torch.Tensor | None = None,
        view_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Everything a training step needs, in one call (DDP synchronises the gradients of
        what runs inside ``forward``): the code, its prompts, its contrastive projection, the
        projection of a second view (masked copy or paired caption) and the temperature."""
        code = self.encode(ids, mask)
        view = None if view_ids is None else self.project(self.encode(view_ids, view_mask))
        return {"code": code, "prompts": self.expand(code), "proj": self.project(code),
                "view_proj": view, "temp": self.temp.clamp(0.001, 0.5)}  # fmt: skip

    def head_state(self) -> dict[str, torch.Tensor]:
        """The tensors that expand a code (what a compact cache keeps)."""
        return {
            k: v.detach().cpu().float()
            for k, v in self.state_dict().items()
            if k.startswith(("cls_proj.", "pooler.", "llm_proj."))
        }

    # --- text in -------------------------------------------------------------------------
    def encoder_batch(
        self, caption_ids: Sequence[Sequence[int]], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption token ids (already truncated) -> right-padded encoder input and its mask:
        ``prefix_ids + caption + suffix_ids`` per row ([CLS] first, so its state is the code)."""
        cfg = self.cfg
        rows = [list(cfg.prefix_ids) + list(c) + list(cfg.suffix_ids) for c in caption_ids]
        ids, mask = pad_batch(rows, cfg.pad_id)
        device = device or self.device
        return ids.to(device), mask.to(device)


def _hf_encoder_from_config(cfg: PredictorConfig) -> HFEncoder:
    from transformers import AutoConfig, AutoModel

    conf = dict(cfg.encoder_config)
    return HFEncoder(AutoModel.from_config(AutoConfig.for_model(**conf)))


# --- tokenising (the one definition training and caching share) ----------------------------------


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
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def mask_tokens(
    ids: torch.Tensor, mask: torch.Tensor, cfg: PredictorConfig, prob: float, gen: torch.Generator
) -> torch.Tensor:
    """Replace each caption token by [MASK] with probability ``prob`` (BLIText masks 25% of
    the encoder's input): the predictor learns to restore what it cannot see, a denoising
    objective. Special ids ([CLS], [SEP]) and padding are never masked."""
    if prob <= 0 or cfg.mask_id < 0:
        return ids
    draw = torch.rand(ids.shape, generator=gen).to(ids.device) < prob
    special = torch.zeros_like(draw)
    special[:, : len(cfg.prefix_ids)] = True
    lengths = mask.sum(1)
    for k in range(1, len(cfg.suffix_ids) + 1):
        special[torch.arange(len(ids)), lengths - k] = True
    return torch.where(draw & ~special & mask.bool(), torch.full_like(ids, cfg.mask_id), ids)


# --- the three loss terms (pure) ------------------------------------------------------------------


def prompted_logits(
    llm: nn.Module, prompts: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits of the frozen LLM at the positions that predict ``ids[:, 1:]``, when the N
    prompts are fed as ``inputs_embeds`` ahead of the token embeddings of ``ids``:

        inputs  = [p_1 … p_N, emb(ids_0), emb(ids_1), …]     positions 0 … N + L - 1
        returns logits at positions N … N + L - 2            [B, L - 1, V]

    Right padding of ``ids`` is masked; position ids count from 0 at p_1 either way.
    """
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
    """(a) Mean cross-entropy over every caption token (and EOS) of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE)  # fmt: skip


def contrastive_loss(
    a: torch.Tensor,
    b_all: torch.Tensor,
    temp: torch.Tensor,
    offset: int = 0,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """(b) InfoNCE of this worker's unit vectors ``a`` [B, p] against the global batch
    ``b_all`` [M, p]: row i's positive is ``b_all[offset + i]``, every other row a negative.
    Label smoothing 0.1 as in BLIText's code."""
    logits = a @ b_all.T / temp
    targets = torch.arange(len(a), device=a.device) + offset
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


@torch.no_grad()
def nearest_rows(flat: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest row of ``table`` [V, D] (Euclidean) for each row of ``flat``
    [M, D], in chunks so a 150k-token vocabulary never needs an [M, V] matrix at once."""
    sq = (table.float() ** 2).sum(1)
    out = []
    for s in range(0, len(flat), chunk):
        x = flat[s : s + chunk].float()
        # |x - t|^2 = |x|^2 + |t|^2 - 2 x·t; |x|^2 is the same for every t, so it is left out.
        out.append((sq[None] - 2 * x @ table.float().T).argmin(1))
    return torch.cat(out)


def nearest_row_loss(prompts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(c) Mean squared distance of each prompt vector to its nearest row of the LLM's
    input-embedding matrix, the row held fixed (stop-gradient): it pulls prompts towards
    token embeddings the LLM knows, without moving the (frozen) table."""
    flat = prompts.reshape(-1, prompts.shape[-1])
    rows = table.detach()[nearest_rows(flat.detach(), table)].to(flat.dtype)
    return F.mse_loss(flat, rows)


# --- building, saving, loading --------------------------------------------------------------------


def new_predictor(
    cfg: PredictorConfig, llm_tokenizer, llm_width: int
) -> tuple[PromptPredictor, object]:
    """A freshly initialised predictor and its tokenizer; ``cfg``'s token fields are filled."""
    cfg.llm_width = int(llm_width)
    if cfg.encoder == "own":
        tokenizer = llm_tokenizer
        cfg.vocab_size = len(tokenizer)
        cfg.prefix_ids, cfg.suffix_ids = [cfg.vocab_size], []  # the [CLS] row
        cfg.mask_id = cfg.vocab_size + 1
        cfg.pad_id = int(tokenizer.pad_token_id or 0)
        cfg.validate()
        return PromptPredictor(cfg), tokenizer
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.encoder)
        model = AutoModel.from_pretrained(cfg.encoder)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot load the encoder {cfg.encoder!r} ({e}); give a Hugging Face encoder name "
            "or folder (e.g. bert-base-uncased), or --encoder own"
        ) from None
    cfg.width = int(model.config.hidden_size)
    cfg.encoder_config = model.config.to_dict()
    cfg.prefix_ids = [] if tokenizer.cls_token_id is None else [tokenizer.cls_token_id]
    cfg.suffix_ids = [] if tokenizer.sep_token_id is None else [tokenizer.sep_token_id]
    cfg.mask_id = -1 if tokenizer.mask_token_id is None else int(tokenizer.mask_token_id)
    cfg.pad_id = int(tokenizer.pad_token_id or 0)
    cfg.vocab_size = len(tokenizer)
    cfg.validate()
    return PromptPredictor(cfg, HFEncoder(model)), tokenizer


def save_predictor(out: Path, model: PromptPredictor, tokenizer, info: dict | None = None) -> Path:
    """``out/predictor.json`` (config + ``info``: the LLM, its fingerprint, steps),
    ``out/model.safetensors`` and the encoder's tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / WEIGHTS_FILE)
    tokenizer.save_pretrained(out)
    meta = {"format": FORMAT, "config": asdict(model.cfg), **(info or {})}
    (out / PREDICTOR_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def predictor_dir(path: str | Path) -> Path:
    """The predictor folder of ``path``: a run directory (its ``predictor/``) or the folder."""
    p = Path(path).expanduser()
    if (p / PREDICTOR_DIR / PREDICTOR_FILE).is_file():
        return p / PREDICTOR_DIR
    if (p / PREDICTOR_FILE).is_file():
        return p
    raise InputError(
        f"{path} is not a P-Former predictor (no {PREDICTOR_FILE}); make one with "
        "`facetclip pformer CAPTIONS --model LLM --out PF`"
    )


def predictor_info(path: str | Path) -> dict:
    """The parsed ``predictor.json`` (config, llm, llm_fingerprint, steps, …)."""
    d = predictor_dir(path)
    try:
        meta = json.loads((d / PREDICTOR_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{d / PREDICTOR_FILE} is unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{d} holds predictor format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def predictor_fingerprint(path: str | Path) -> str:
    """sha256 over predictor.json, the weights and the tokenizer files: what a cache's recipe
    records, so prompts of two different predictors never mix in one cache."""
    d = predictor_dir(path)
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return "sha256:" + h.hexdigest()


class LoadedPredictor:
    """A predictor with its tokenizer, ready for ``predict_prompts(texts) -> [n, N, D]``."""

    def __init__(self, model: PromptPredictor, tokenizer, info: dict, path: Path):
        self.model, self.tokenizer, self.info, self.path = model, tokenizer, info, path
        self.cfg = model.cfg

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return caption_token_ids(
            self.tokenizer, texts, self.cfg.cleanup, self.cfg.max_caption_tokens
        )[0]

    @torch.no_grad()
    def predict_codes(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[n, d] pooled codes of ``texts`` (float32, on the predictor's device)."""
        return self.codes_of_ids(self.token_ids(texts), batch_size)

    @torch.no_grad()
    def codes_of_ids(
        self, caption_ids: Sequence[Sequence[int]], batch_size: int = 256
    ) -> torch.Tensor:
        out = []
        for s in range(0, len(caption_ids), batch_size):
            ids, mask = self.model.encoder_batch(caption_ids[s : s + batch_size])
            out.append(self.model.encode(ids, mask).float())
        if not out:
            return torch.zeros((0, self.cfg.width), device=self.model.device)
        return torch.cat(out)

    @torch.no_grad()
    def predict_prompts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[n, N, D] prompt vectors of ``texts`` (float32) for the predictor's frozen LLM."""
        return self.model.expand(self.predict_codes(texts, batch_size)).float()


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> LoadedPredictor:
    """A trained predictor from a ``facetclip pformer`` run directory or its ``predictor/``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    d = predictor_dir(path)
    info = predictor_info(d)
    cfg = PredictorConfig.from_dict(info["config"])
    model = PromptPredictor(cfg)
    model.load_state_dict(load_file(d / WEIGHTS_FILE))
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(d)
    return LoadedPredictor(model, tokenizer, info, d)
