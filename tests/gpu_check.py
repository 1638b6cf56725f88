"""``make gpu-check`` / ``python -m tests.gpu_check``: the checks that need a CUDA GPU.

Without a GPU it says so and exits 0. With a GPU it runs (a)-(e); the vLLM halves of (a)-(c)
only where vLLM is installed:

(a) **agreement** — the hf engine on the GPU, in fp32 and bf16, against the hf engine in fp32
    on the CPU (the definition), and, with vLLM, the vllm engine (bf16) against both hf
    engines on the GPU; on the same synthetic captions and an untrained small Llama it builds
    itself. fp32 on the GPU must give >= 0.99999, every bf16 engine >= 0.999 (min cosine).
(b) **context reuse** (vLLM) — vLLM's own count of prompt tokens served by its prefix cache
    (``PoolingRequestOutput.num_cached_tokens``) for flame-long, against the most an
    unbounded cache could serve (whole blocks) and against "context once per caption".
(c) **throughput** — captions/s and effective TFLOP/s of the hf engine (and vLLM) for
    flame-long on a Llama-3-8B-shaped model with random weights (vLLM: ``load_format="dummy"``;
    hf: the same config initialised randomly on the GPU), bf16:

        effective TFLOP/s = 2 x P x T / seconds / 1e12
        P = decoder parameters (embedding and LM head excluded: neither does a matmul here)
        T = useful tokens = sum over captions of (context + all facet tokens), the same T for
            both engines (attention FLOPs are not counted)

(d) **stage two** — ViT-B/16 at 224 px, FLAME's token-mlp head into a 4096-wide LLM space,
    batch 256, bf16, mp-sigmoid: training images/s, and the loader's images/s (decode +
    RandomResizedCrop + normalise on every CPU core), side by side.
(e) **tune** (LLM2CLIP) — one worker's step on a Llama-3-8B-shaped model with random bf16
    weights and LoRA r 16 on all 7 projections, 64 synthetic short/long pairs (the README's
    per-GPU batch), with and without gradient checkpointing: peak GPU memory, pairs/s and MFU
    (4 x P x T per step against 989 TFLOP/s; and 6 x P x T, the recomputed forward counted).

Exit status 1 when (a) or (b) fails. Sizes are flags; the defaults run in a few minutes.
``--smoke`` runs every check on the CPU with toy sizes (the test suite's check that this script
runs; its figures mean nothing):

    python -m tests.gpu_check [--captions 64] [--bench-captions 1024] [--skip-bench] [--eager]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

COSINE_TARGET = 0.999  # any bf16 engine against hf fp32
FP32_TARGET = 0.99999  # hf fp32 on the GPU against hf fp32 on the CPU: only summation order differs
CACHE_TARGET = 0.9  # cached tokens >= 0.9 x what an unbounded prefix cache would serve
AGREEMENT_CASES = (("flame-long", -1), ("flame-long", 2), ("llm2clip", -1))

# Meta-Llama-3-8B's config.json (shape only; the weights are random).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
# --smoke: the same code on the CPU, a 2-layer model of the same vocabulary
SMOKE_SHAPE = {
    **LLAMA3_8B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 (plan's table)


def missing_requirements() -> list[str]:
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM is not installed (pip install -e '.[vllm]')")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU (torch.cuda.is_available() is False)")
    return missing


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def synth_rows(n: int, start: int = 0) -> list[dict]:
    from eval.synth import iter_samples

    return [
        {"caption": s.caption, "short_caption": s.short_caption, "long_caption": s.long_caption}
        for s in iter_samples(n, seed=0, start=start)
    ]


def encode(model_dir: Path, recipe_name: str, rows: list[dict]) -> list:
    from transformers import AutoTokenizer

    from embed.prompts import BUILTIN_RECIPES
    from embed.tokenize import PromptTokenizer

    recipe = BUILTIN_RECIPES[recipe_name]
    tok = PromptTokenizer(AutoTokenizer.from_pretrained(model_dir), recipe)
    encoded = tok.encode([[row[g.column] for g in recipe.groups] for row in rows])
    return [it for e in encoded for it in e.items]


def build_small_llm(out: Path) -> Path:
    """Untrained 4-layer Llama, head size 64 (a size every vLLM attention kernel takes)."""
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    cfg = TinyLLMConfig(
        steps=0,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=512,
        n_captions=400,
    )
    build_tiny_llm(out, cfg, progress=False)
    return out


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- (a) agreement and (b) context reuse --------------------------------------------------------


def engine_config(model: Path, recipe_name: str, layer: int, dtype: str, **kw):
    from embed.engine import EngineConfig
    from embed.prompts import BUILTIN_RECIPES

    pooling = BUILTIN_RECIPES[recipe_name].pooling
    return EngineConfig(str(model), pooling=pooling, layer=layer, dtype=dtype, **kw)


def check_hf_agreement(model: Path, rows: list[dict], device: str) -> tuple[bool, dict]:
    """(a), hf half: the hf engine on ``device`` in fp32 and bf16 against the hf engine in
    fp32 on the CPU, which is the definition stage one honours. Returns the verdict and, per
    case, (items, fp32 vectors, bf16 vectors) on ``device``, for the vLLM half."""
    from embed.hf_engine import HFEngine

    ok, results, hf = True, [], {}
    for recipe_name, layer in AGREEMENT_CASES:
        items = encode(model, recipe_name, rows)

        ref, g32, g16 = (
            HFEngine(engine_config(model, recipe_name, layer, dtype, device=dev)).embed(items)
            for dtype, dev in (("float32", "cpu"), ("float32", device), ("bfloat16", device))
        )
        hf[recipe_name, layer] = (items, g32, g16)
        if device != "cpu":
            free_cuda()
        c32, c16 = cosine(g32, ref).min(), cosine(g16, ref).min()
        passed = bool(c32 >= FP32_TARGET and c16 >= COSINE_TARGET)
        ok &= passed
        layer_name = "last" if layer == -1 else str(layer)
        results.append([recipe_name, layer_name, len(ref), f"{c32:.7f}", f"{c16:.6f}",
                        "PASS" if passed else "FAIL"])  # fmt: skip
    print(f"(a) hf engine on {device} vs hf engine fp32 on the CPU, {len(rows)} synthetic "
          "captions, untrained 4-layer Llama")  # fmt: skip
    headers = ["recipe", "layer", "vectors", f"min cos, fp32 (>= {FP32_TARGET})",
               f"min cos, bf16 (>= {COSINE_TARGET})", ""]  # fmt: skip
    print(table(headers, results) + "\n", flush=True)
    return ok, hf


def check_agreement(model: Path, hf: dict, eager: bool) -> tuple[bool, dict]:
    """(a), vLLM half: the vllm engine (bf16) against the hf engine's GPU vectors of
    ``check_hf_agreement`` (fp32 and bf16), case by case; and (b)'s cache counts."""
    from embed.vllm_engine import VLLMEngine, expected_cached_tokens, facet_requests

    ok = True
    results, cache = [], {}
    for (recipe_name, layer), (items, ref, hf16) in hf.items():
        cfg = engine_config(model, recipe_name, layer, "bfloat16", gpu_memory_utilization=0.4)
        with VLLMEngine(cfg, enforce_eager=eager) as v:
            got = v.embed(items)
            if recipe_name == "flame-long" and layer == -1:
                requests = facet_requests(items)
                cache = {
                    "captions": len(items),
                    "facets": len(items[0].facets),
                    "block_size": v.block_size,
                    "prompt": v.prompt_tokens,
                    "cached": v.cached_tokens,
                    "ideal": expected_cached_tokens(requests, v.block_size),
                    "context_once": sum((len(it.facets) - 1) * len(it.context) for it in items),
                    "packed": sum(it.packed_length for it in items),
                }
        free_cuda()
        if got.shape == ref.shape:
            c32, c16 = cosine(got, ref).min(), cosine(got, hf16).min()
        else:  # a wrong shape fails the case without a crash
            c32 = c16 = float("nan")
        passed = c32 >= COSINE_TARGET and c16 >= COSINE_TARGET
        ok &= bool(passed)
        layer_name = "last" if layer == -1 else str(layer)
        results.append(
            [
                recipe_name,
                layer_name,
                got.shape[0],
                f"{c32:.6f}",
                f"{c16:.6f}",
                "PASS" if passed else "FAIL",
            ]
        )
    print(
        f"(a) vllm (bf16) vs hf engine on the GPU, {len(items)} synthetic captions, untrained 4-layer Llama"
    )
    headers = [
        "recipe",
        "layer",
        "vectors",
        "min cos vs hf fp32",
        "min cos vs hf bf16",
        f">= {COSINE_TARGET}",
    ]
    print(table(headers, results), flush=True)
    return ok, cache


def report_cache(c: dict) -> bool:
    def pct(n):
        return f"{n:>9,}  ({100 * n / c['prompt']:.1f}% of prompt tokens)"

    computed = c["prompt"] - c["cached"]
    ok = c["cached"] >= CACHE_TARGET * c["ideal"] > 0
    print(
        f"\n(b) vLLM prefix cache, flame-long: {c['captions']} captions x {c['facets']} facet "
        f"requests, block size {c['block_size']}\n"
        f"  prompt tokens sent           {c['prompt']:>9,}\n"
        f"  served from cache (vLLM)     {pct(c['cached'])}\n"
        f"  most a cache could serve     {pct(c['ideal'])}   whole blocks, <= len - 1 per request\n"
        f"  context once per caption     {pct(c['context_once'])}   (K - 1) x context tokens\n"
        f"  tokens vLLM computed         {computed:>9,}  = {computed / c['packed']:.3f} x the hf "
        f"engine's packed tokens (context once + facets)\n"
        f"  reuse {'PASS' if ok else 'FAIL'}: cached >= {CACHE_TARGET} x most a cache could serve",
        flush=True,
    )
    return ok


# --- (c) throughput ---------------------------------------------------------------------------


def write_llama_shape(out: Path, tokenizer_dir: Path, shape: dict = LLAMA3_8B) -> Path:
    """A model directory with ``shape`` as its config (Llama-3-8B's by default) and no weights,
    plus the small LM's tokenizer (only ids matter; every id of it is < 128256)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shape, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def decoder_params(c: dict) -> int:
    """Parameters of the decoder layers and final norm of a Llama config."""
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + h


def random_hf_engine(cfg, config_dir: Path):
    """An HFEngine whose model is built from ``config_dir``'s config with random weights on the
    GPU (no 16 GB checkpoint to write and read)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from embed.hf_engine import _TORCH_DTYPES, HFEngine

    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = AutoModel.from_config(
            AutoConfig.from_pretrained(config_dir), dtype=_TORCH_DTYPES[cfg.dtype]
        )
    tok = AutoTokenizer.from_pretrained(config_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    engine = HFEngine.from_model(model, pad_id, cfg)
    return engine


def timed(engine, items, warmup_items) -> tuple[float, int, int]:
    """Seconds, useful tokens and computed tokens of ``engine.embed(items)`` after a warm-up on
    other captions (so vLLM's prefix cache holds nothing of ``items``)."""
    engine.embed(warmup_items)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    real0, computed0 = engine.real_tokens, engine.computed_tokens
    t0 = time.perf_counter()
    engine.embed(items)  # returns host arrays: the GPU work is done
    seconds = time.perf_counter() - t0
    return seconds, engine.real_tokens - real0, engine.computed_tokens - computed0


def check_throughput(tmp: Path, tokenizer_dir: Path, args, with_vllm: bool) -> None:
    from embed.engine import EngineConfig

    shape = SMOKE_SHAPE if args.smoke else LLAMA3_8B
    model = write_llama_shape(tmp / "llama-shape", tokenizer_dir, shape)
    items = encode(tokenizer_dir, "flame-long", synth_rows(args.bench_captions, start=100_000))
    warmup = encode(tokenizer_dir, "flame-long", synth_rows(args.warmup_captions, start=200_000))
    params = decoder_params(shape)
    n = len(items)
    context = np.mean([len(it.context) for it in items])
    facets = np.mean([sum(len(f) for f in it.facets) for it in items])
    print(
        f"(c) throughput, flame-long, {n} captions (mean context {context:.0f} tokens, "
        f"7 facets {facets:.0f} tokens), {'toy' if args.smoke else 'Llama-3-8B'} shape, "
        f"random weights, bf16\n"
        f"  effective TFLOP/s = 2 x P x T / s / 1e12, P = {params / 1e9:.2f}e9 decoder parameters, "
        f"T = useful tokens (context once + facets)",
        flush=True,
    )
    rows = []
    cfg = EngineConfig(
        str(model), dtype="bfloat16", device=args.device, token_budget=args.hf_token_budget
    )
    hf = random_hf_engine(cfg, model)
    rows.append(("hf", *timed(hf, items, warmup)))
    del hf
    if with_vllm:
        from embed.vllm_engine import VLLMEngine

        free_cuda()
        vcfg = EngineConfig(
            str(model), dtype="bfloat16", gpu_memory_utilization=args.gpu_memory_utilization
        )
        with VLLMEngine(vcfg, load_format="dummy", enforce_eager=args.eager) as v:
            rows.append(("vllm", *timed(v, items, warmup)))
    out = []
    for name, seconds, useful, computed in rows:
        out.append(
            [
                name,
                f"{seconds:.2f}",
                f"{n / seconds:,.1f}",
                f"{useful / seconds:,.0f}",
                f"{computed / useful:.3f}",
                f"{2 * params * useful / seconds / 1e12:,.1f}",
            ]
        )
    headers = [
        "engine",
        "seconds",
        "captions/s",
        "useful tok/s",
        "computed / useful",
        "eff. TFLOP/s",
    ]
    print(table(headers, out))
    print(
        "  computed / useful: hf counts padding, vLLM counts what its prefix cache did not serve\n"
    )


def _decode_chunk(args) -> int:
    """One loader worker's share: decode + RandomResizedCrop + normalise (train.transforms)."""
    jpegs, size = args
    from train.transforms import IMAGE_BYTES, ImageTransform, decode_batch

    t = ImageTransform(image_size=size)
    decode_batch({"key": [str(i) for i in range(len(jpegs))], IMAGE_BYTES: jpegs}, t)
    return len(jpegs)


def check_vit_training(args, device: str) -> None:
    """(d) Stage two on the GPU: a ViT-B/16 at 224 px with FLAME's token-mlp head into a
    4096-wide LLM space, batch 256, bf16 autocast, mp-sigmoid over 6 of 7 cached facets:
    training images/s; and the loader (decode + RandomResizedCrop + normalise on every CPU
    core) images/s, side by side."""
    import multiprocessing as mp

    from eval.synth import encode_jpeg, iter_samples
    from train.losses import compute_loss, select_facets
    from train.model import ModelConfig, build_model, make_optimizer

    b, size, dim = args.vit_batch, args.vit_size, args.vit_text_dim
    kwargs = {"img_size": size} if args.vit_tower.startswith("vit") else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig(tower=args.vit_tower, tower_kwargs=kwargs), dim).to(device)
    optimizer = make_optimizer(model, 5e-4, (0.9, 0.95), 0.5, device)  # train's: fused
    images = torch.randn(b, 3, size, size, device=device)
    vectors = torch.nn.functional.normalize(torch.randn(b, 7, dim, device=device), dim=-1)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        text_in = select_facets(vectors, "mp-sigmoid", "sample", 6, gen)  # as train.loop
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            out = model(images, text_in)
        loss = compute_loss("mp-sigmoid", **out)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.vit_warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.vit_steps):
        step()
    sync()
    train_rate = b * args.vit_steps / (time.perf_counter() - t0)

    jpegs = [
        encode_jpeg(s.image)
        for s in iter_samples(args.vit_loader_images, seed=0, render=True, image_size=256)
    ]
    workers = min(os.cpu_count() or 1, args.vit_loader_workers)
    chunks = [(jpegs[i::workers], size) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_decode_chunk, [(c[0][:4], size) for c in chunks])  # warm-up: imports
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks))
        loader_rate = n / (time.perf_counter() - t0)
    print("(d) stage two on this device")
    print(table(["", "images/s"], [[f"training ({args.vit_tower}, {size} px, batch {b}, bf16)", f"{train_rate:,.0f}"],
                                  [f"loader ({workers} processes, 256 px JPEG -> {size} px)", f"{loader_rate:,.0f}"]]))  # fmt: skip
    print(f"loader / training: {loader_rate / train_rate:.2f} (>= 1: the GPU is not starved)\n")


def check_tune(args, tokenizer_dir: Path) -> None:
    """(e) One `tune` worker's step (embed.tune's CaptionEncoder, LoRA and loss, as its
    worker_loop runs them) on a Llama-3-8B-shaped model with random bf16 weights: peak memory,
    pairs/s and MFU, with and without gradient checkpointing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from embed.prompts import get_recipe
    from embed.tokenize import PromptTokenizer
    from embed.tune import (
        CaptionEncoder,
        LoraOptions,
        TuneConfig,
        add_lora,
        caption_contrastive_loss,
    )

    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    shape = SMOKE_SHAPE if args.smoke else LLAMA3_8B
    config = AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if cuda else torch.float32
        )
    weights = torch.cuda.memory_allocated() if cuda else 0
    lm = add_lora(base, LoraOptions(), seed=0).to(device)
    lm.train()
    encoder = CaptionEncoder(lm)
    ptok = PromptTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), get_recipe("llm2clip"))
    rows = synth_rows(args.tune_pairs, start=300_000)
    texts = [r["short_caption"] for r in rows] + [r["long_caption"] for r in rows]
    items = [e.items[0] for e in ptok.encode([[t] for t in texts])]
    tokens = sum(len(it.context) for it in items)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    budget, n = TuneConfig().token_budget, args.tune_pairs
    p_matmul = decoder_params(shape)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            vectors = encoder.encode(items, ptok.pad_id, device, budget)
        loss = caption_contrastive_loss(vectors[:n], vectors[n:])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out = []
    for checkpointing in (True, False):
        if checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            base.gradient_checkpointing_disable()
        if cuda:
            free_cuda()
            torch.cuda.reset_peak_memory_stats()
        try:
            step()  # warm-up; the optimizer's state is allocated here
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.tune_steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / args.tune_steps
        except torch.OutOfMemoryError:
            out.append(["on" if checkpointing else "off", "out of memory", "", "", "", ""])
            continue
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        out.append([
            "on" if checkpointing else "off",
            f"{peak / 1e9:.1f}",
            f"{(peak - weights) / 1e9:.1f}",
            f"{n / seconds:,.1f}",
            f"{4 * p_matmul * tokens / seconds / PEAK_BF16:.2f}",
            f"{(6 if checkpointing else 4) * p_matmul * tokens / seconds / PEAK_BF16:.2f}",
        ])  # fmt: skip
    lora = sum(p.numel() for p in params)
    print(
        f"(e) tune step, {'toy' if args.smoke else 'Llama-3-8B'} shape, random bf16 weights "
        f"({weights / 1e9:.1f} GB), LoRA {lora / 1e6:.1f} M parameters, {n} pairs = "
        f"{tokens:,} tokens ({tokens / n:.0f} per pair), token budget {budget}"
    )
    headers = ["checkpointing", "peak GB", "beyond GB", "pairs/s", "MFU (4PT)", "with recompute"]
    print(table(headers, out))
    print(
        "  MFU: 4 x P x T per step over 989 TFLOP/s; with recompute: 6 x P x T if checkpointing\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--captions", type=int, default=64, help="captions for (a) and (b)")
    parser.add_argument("--bench-captions", type=int, default=1024, help="captions timed in (c)")
    parser.add_argument(
        "--warmup-captions", type=int, default=64, help="untimed captions before (c)"
    )
    parser.add_argument(
        "--hf-token-budget", type=int, default=16384, help="hf engine tokens per pass"
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM, in (c)")
    parser.add_argument("--skip-bench", action="store_true", help="skip (c) and (e)")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="vLLM without torch.compile and CUDA graphs (faster start)",
    )
    parser.add_argument("--vit-tower", default="vit_base_patch16_224", help="(d) timm tower")
    parser.add_argument("--vit-size", type=int, default=224, help="(d) image side")
    parser.add_argument("--vit-batch", type=int, default=256, help="(d) batch size")
    parser.add_argument("--vit-text-dim", type=int, default=4096, help="(d) LLM width")
    parser.add_argument("--vit-steps", type=int, default=10, help="(d) timed steps")
    parser.add_argument("--vit-warmup", type=int, default=3, help="(d) untimed steps")
    parser.add_argument("--vit-loader-images", type=int, default=2048, help="(d) images decoded")
    parser.add_argument("--vit-loader-workers", type=int, default=64, help="(d) at most")
    parser.add_argument("--tune-pairs", type=int, default=64, help="(e) pairs per step")
    parser.add_argument("--tune-steps", type=int, default=3, help="(e) timed steps")
    parser.add_argument("--device", default="cuda", help="where (a) and (c)-(e) run")
    parser.add_argument(
        "--smoke", action="store_true", help="every check on the CPU with toy sizes (tests)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.captions, args.bench_captions, args.warmup_captions = 4, 4, 2
        args.vit_tower, args.vit_size, args.vit_batch, args.vit_text_dim = "resnet10t", 32, 4, 32
        args.vit_steps, args.vit_warmup, args.vit_loader_images = 1, 1, 8
        args.vit_loader_workers, args.tune_pairs, args.tune_steps = 2, 4, 1

    if not torch.cuda.is_available() and args.device.startswith("cuda"):
        print(
            "gpu-check: skipped: no CUDA GPU (torch.cuda.is_available() is False). Nothing to check on this machine."
        )
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    missing = missing_requirements() if not args.smoke else ["--smoke"]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"gpu-check: {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    if missing:
        print("gpu-check: vLLM halves skipped: " + "; ".join(missing) + ".")
    print(flush=True)

    check_vit_training(args, args.device)
    with tempfile.TemporaryDirectory(prefix="facetclip-gpu-check-") as tmp:
        tmp = Path(tmp)
        model = build_small_llm(tmp / "small-llm")
        ok, hf = check_hf_agreement(model, synth_rows(args.captions), args.device)
        if not args.skip_bench:
            check_tune(args, model)
            if args.device.startswith("cuda"):
                free_cuda()
        if not missing:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            import vllm

            print(f"vLLM {vllm.__version__}\n")
            agree, cache = check_agreement(model, hf, args.eager)
            ok &= agree and report_cache(cache)
        if not args.skip_bench:
            check_throughput(tmp, model, args, with_vllm=not missing)
    print(f"\ngpu-check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
