"""Stage two: a training step with cached text vectors vs the same step with the small LM
computing the text side online (what training without a cache costs), alternated step by
step in one process; and the data pipeline's decode rate vs what training consumes.

The step: the demo's tower (a 4-layer ViT at 64 px), FLAME's token-mlp head, mp-sigmoid with
6 of 7 facets (recipe flame-long), batch 64, AdamW, on this machine's CPU. Online, the text
side is the packed hf engine over the batch's long captions, i.e. the cheapest way to run
the LLM inside the loop; cached, it is a lookup of the same vectors.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.bench import Report, Target

FULL = {"captions": 256, "batch": 64, "steps": 6, "llm_hidden": 256}
QUICK = {"captions": 128, "batch": 32, "steps": 3, "llm_hidden": 128}


def run(quick: bool = False) -> Report:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed.engine import EngineConfig
    from embed.hf_engine import HFEngine
    from embed.pipeline import EmbedConfig, run_embed
    from embed.prompts import BUILTIN_RECIPES
    from embed.tokenize import PromptTokenizer
    from eval.demo import DEMO_TOWER, DEMO_TOWER_KWARGS
    from eval.synth import encode_jpeg, iter_samples
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm
    from store.reader import KeyIndex
    from train.losses import compute_loss, select_facets
    from train.model import ModelConfig, build_model
    from train.transforms import IMAGE_BYTES, ImageTransform, decode_batch

    p = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        h = p["llm_hidden"]
        llm = tmp / "llm"
        build_tiny_llm(llm, TinyLLMConfig(steps=0, hidden_size=h, num_layers=4, intermediate_size=3 * h, n_captions=300), progress=False)  # fmt: skip
        samples = list(iter_samples(p["captions"], seed=5, render=True))
        keys = [s.key for s in samples]
        captions = [s.long_caption for s in samples]
        jpegs = [encode_jpeg(s.image) for s in samples]
        table = tmp / "captions.parquet"
        pq.write_table(pa.table({"key": keys, "long_caption": captions}), table)
        run_embed(EmbedConfig(table, str(llm), tmp / "cache", recipe="flame-long"), progress=False)
        index = KeyIndex.load(tmp / "cache")
        names = index.cache.manifest.layout["vector_names"]

        recipe = BUILTIN_RECIPES["flame-long"]
        engine = HFEngine(EngineConfig(str(llm), device="cpu"))
        from transformers import AutoTokenizer

        tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(llm), recipe)
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(tower=DEMO_TOWER, tower_kwargs=dict(DEMO_TOWER_KWARGS)), engine.hidden_size
        )
        optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
        transform = ImageTransform(image_size=64)
        gen = torch.Generator().manual_seed(0)
        b = p["batch"]

        def text_cached(sel):
            v = index.vectors([keys[i] for i in sel], names)
            return torch.from_numpy(np.stack([v[n] for n in names], axis=1))

        def text_online(sel):
            encoded = tokenizer.encode([[captions[i]] for i in sel])
            v = engine.embed([e.items[0] for e in encoded]).reshape(len(sel), len(names), -1)
            v /= np.linalg.norm(v, axis=2, keepdims=True)
            return torch.from_numpy(v)

        def step(sel, text_fn) -> float:
            t0 = time.perf_counter()
            batch = decode_batch(
                {"key": [keys[i] for i in sel], IMAGE_BYTES: [jpegs[i] for i in sel]}, transform
            )
            vectors = text_fn(sel)
            text_in = select_facets(vectors, "mp-sigmoid", "sample", 6, gen)
            loss = compute_loss("mp-sigmoid", **model(torch.from_numpy(batch["image"]), text_in))[
                "loss"
            ]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return time.perf_counter() - t0

        rng = np.random.default_rng(0)
        times = {"cached": [], "online": []}
        step(rng.choice(len(keys), b, replace=False), text_cached)  # warm-up
        step(rng.choice(len(keys), b, replace=False), text_online)
        for s in range(p["steps"]):
            order = ("cached", "online") if s % 2 == 0 else ("online", "cached")
            for which in order:
                sel = rng.choice(len(keys), b, replace=False)
                times[which].append(step(sel, text_cached if which == "cached" else text_online))

        t0 = time.perf_counter()
        decode_batch({"key": keys, IMAGE_BYTES: jpegs}, transform)
        decode_per_s = len(keys) / (time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    train_images = b / med["cached"]
    cores = torch.get_num_threads()
    table = [
        ["", "cached vectors", "LLM online"],
        ["steps/s", f"{1 / med['cached']:.2f}", f"{1 / med['online']:.2f}"],
        ["images/s", f"{b / med['cached']:.0f}", f"{b / med['online']:.0f}"],
        ["median s/step", f"{med['cached']:.3f}", f"{med['online']:.3f}"],
        [
            "all s/step",
            " ".join(f"{t:.2f}" for t in times["cached"]),
            " ".join(f"{t:.2f}" for t in times["online"]),
        ],
    ]
    notes = [
        f"batch {b}, {DEMO_TOWER} at 64 px, mp-sigmoid 6 of {len(names)} facets, LM width {h} x 4 layers; "
        f"cached is {med['online'] / med['cached']:.1f}x faster per step",
        f"data pipeline: decode + RandomResizedCrop + normalise {decode_per_s:,.0f} images/s on one core "
        f"(Ray Data runs one such task per spare CPU); training consumes {train_images:,.0f} images/s",
    ]
    targets = [
        Target("cached steps/s / online steps/s", med["online"] / med["cached"], 1.0),
        Target("one core's decode rate / training consumption", decode_per_s / train_images, 1.0),
    ]
    return Report(
        f"train step: cached text vectors vs the LM online ({cores} torch threads)",
        table,
        targets,
        notes,
    )
