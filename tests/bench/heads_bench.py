"""Heads only vs end to end: samples/s of a training step that reads a text cache and an image
cache (train.cache_pairs) and trains only the heads, against the end-to-end step of the demo's
tower (resnet10t at 64 px, FLAME's token-mlp, mp-sigmoid 6 of 7 facets), alternated in one
process on one torch thread (what a Ray Train worker with one CPU has). Also the bytes per
image of the image cache.

The end-to-end step is timed twice: with the JPEG decode + crop it needs (done by Ray Data
tasks on other cores in a real run) and without it (the tower's forward and backward alone);
the target is met against the faster of the two. Heads only is timed with the demo's own heads
(token-mlp over the cached 2 x 2 grid, no text head: the same heads as the end-to-end step, so
the ratio is the cost of the tower and the image decode) and with SAIL's glu on both sides
(width 8: 6.8M parameters, more than resnet10t's 4.9M, so at batch 64 the optimiser step over
them dominates; a larger batch, the way heads-only runs are meant to be trained, amortises it).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.bench import Report, Target

FULL = {"images": 1024, "batch": 64, "big_batch": 512, "rounds": 5, "head_steps": 20}
QUICK = {"images": 512, "batch": 64, "big_batch": 256, "rounds": 3, "head_steps": 10}


def run(quick: bool = False) -> Report:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed.pipeline import EmbedConfig, run_embed
    from eval.demo import DEMO_TOWER, DEMO_TOWER_KWARGS
    from eval.synth import encode_jpeg, iter_samples
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm
    from store.reader import KeyIndex
    from train.cache_pairs import iter_pair_batches, plan_pairs
    from train.image_cache import ImageCacheConfig, grid_names, run_embed_images
    from train.losses import compute_loss, select_facets
    from train.model import ModelConfig, build_model
    from train.transforms import IMAGE_BYTES, ImageTransform, decode_batch

    p = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    b = p["batch"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build_tiny_llm(
            tmp / "llm", TinyLLMConfig(steps=0, n_captions=300), progress=False
        )  # the demo's width
        samples = list(iter_samples(p["images"], seed=7, render=True))
        keys = [s.key for s in samples]
        jpegs = [encode_jpeg(s.image) for s in samples]
        (tmp / "images").mkdir()
        for k, j in zip(keys, jpegs, strict=True):
            (tmp / "images" / f"{k}.jpg").write_bytes(j)
        table = tmp / "captions.parquet"
        pq.write_table(
            pa.table({"key": keys, "long_caption": [s.long_caption for s in samples]}), table
        )
        run_embed(
            EmbedConfig(table, str(tmp / "llm"), tmp / "cache", recipe="flame-long"), progress=False
        )
        icache = run_embed_images(
            ImageCacheConfig(images=tmp / "images", out=tmp / "icache", tower=DEMO_TOWER,
                             tower_kwargs=dict(DEMO_TOWER_KWARGS), random_init=True, image_size=64,
                             grid=2),
            progress=False,
        )  # fmt: skip
        pooled_only = run_embed_images(
            ImageCacheConfig(images=tmp / "images", out=tmp / "icache-pooled", tower=DEMO_TOWER,
                             tower_kwargs=dict(DEMO_TOWER_KWARGS), random_init=True, image_size=64),
            progress=False,
        ).bytes_per_image  # fmt: skip
        index = KeyIndex.load(tmp / "cache")
        names = index.cache.manifest.layout["vector_names"]
        text_dim = index.cache.manifest.layout["dim"]

        # --- the end-to-end step (the demo's tower and heads) ------------------------------------
        torch.manual_seed(0)
        e2e = build_model(
            ModelConfig(tower=DEMO_TOWER, tower_kwargs=dict(DEMO_TOWER_KWARGS)), text_dim
        )
        e2e_opt = torch.optim.AdamW(e2e.param_groups(0.05), lr=1e-4)
        transform = ImageTransform(image_size=64)
        gen = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)

        def e2e_step(decode: bool) -> float:
            sel = rng.choice(len(keys), b, replace=False)
            batch = {"key": [keys[i] for i in sel], IMAGE_BYTES: [jpegs[i] for i in sel]}
            v = index.vectors([keys[i] for i in sel], names)
            vectors = torch.from_numpy(np.stack([v[n] for n in names], axis=1))
            if not decode:
                images = torch.from_numpy(decode_batch(batch, transform)["image"])
            t0 = time.perf_counter()
            if decode:  # the decode + crop is part of the timed step
                images = torch.from_numpy(decode_batch(batch, transform)["image"])
            text_in = select_facets(vectors, "mp-sigmoid", "sample", 6, gen)
            loss = compute_loss("mp-sigmoid", **e2e(images, text_in))["loss"]
            e2e_opt.zero_grad()
            loss.backward()
            e2e_opt.step()
            return time.perf_counter() - t0

        # --- heads-only steps from the two caches -----------------------------------------------
        heads = {}
        for name, image_head, text_head, vectors_read, batch in (
            ("token-mlp", "token-mlp", "none", grid_names(2), b),
            ("glu", "glu", "glu", ["pooled"], b),
            (f"glu, batch {p['big_batch']}", "glu", "glu", ["pooled"], p["big_batch"]),
        ):
            cfg = ModelConfig(tower=DEMO_TOWER, image_head=image_head, text_head=text_head,
                              token_grid=2, embed_dim=512)  # fmt: skip
            plan = plan_pairs(str(tmp / "cache"), str(tmp / "icache"), image_vectors=vectors_read)
            torch.manual_seed(0)
            model = build_model(cfg, text_dim, image_dim=plan.image_dim)
            opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4)
            heads[name] = (plan, model, opt, batch, image_head)

        def batches(plan, batch: int):
            epoch = 0
            while True:
                yield from iter_pair_batches(plan, batch, seed=0, epoch=epoch)
                epoch += 1

        streams = {h: batches(v[0], v[3]) for h, v in heads.items()}

        def head_steps(name: str, n: int) -> float:
            """Seconds per sample over ``n`` steps, each reading its batch from both caches."""
            plan, model, opt, batch, image_head = heads[name]
            t0 = time.perf_counter()
            for _ in range(n):
                text, image, _ = next(streams[name])
                image = torch.from_numpy(image)
                image = image if image_head == "token-mlp" else image[:, 0]
                text_in = select_facets(torch.from_numpy(text), "mp-sigmoid", "sample", 6, gen)
                loss = compute_loss("mp-sigmoid", **model(image, text_in))["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
            return (time.perf_counter() - t0) / (n * batch)

        def read_only(n: int) -> float:
            """Seconds per sample of reading batches from the two caches, no step."""
            t0 = time.perf_counter()
            for _ in range(n):
                next(streams["token-mlp"])
            return (time.perf_counter() - t0) / (n * b)

        times = {"e2e+decode": [], "e2e": [], **{h: [] for h in heads}, "read only": []}
        e2e_step(False)  # warm-up
        for h in heads:
            head_steps(h, 2)
        for r in range(p["rounds"]):  # alternated, so machine load hits all alike
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for which in order:
                if which.startswith("e2e"):
                    times[which].append(e2e_step(decode=which == "e2e+decode") / b)
                elif which == "read only":
                    times[which].append(read_only(p["head_steps"]))
                else:
                    times[which].append(head_steps(which, p["head_steps"]))
    torch.set_num_threads(threads)

    rate = {k: 1 / statistics.median(v) for k, v in times.items()}  # samples/s
    e2e_best = max(rate["e2e"], rate["e2e+decode"])
    table = [
        [f"step (batch {b} unless named, 1 thread)", "samples/s", "x end to end (tower only)"],
        *[[k, f"{rate[k]:,.0f}", f"{rate[k] / rate['e2e']:.1f}"] for k in times],
    ]
    notes = [
        "e2e: the demo's resnet10t at 64 px + token-mlp, mp-sigmoid 6 of 7 facets; e2e+decode adds "
        "the JPEG decode + crop of its batch; heads only: the same loss, batches read from the "
        "text cache and the image cache (token-mlp: 2 x 2 grid tokens; glu: pooled feature); "
        "read only: the token-mlp run's batches from the two caches, no step",
        f"image cache: {icache.bytes_per_image:,.0f} bytes per image (pooled 512 + 2 x 2 grid "
        f"tokens, float16), {pooled_only:,.0f} with the pooled feature alone (the JPEGs here: "
        f"{sum(map(len, jpegs)) / len(jpegs):,.0f}); embedded at {icache.images_per_s:,.0f} "
        "images/s",
    ]
    targets = [
        Target("heads-only step (the demo's heads) / faster end-to-end step, per sample",
               rate["token-mlp"] / e2e_best, 50.0, digits=1),
    ]  # fmt: skip
    return Report(
        "heads only from two caches vs end to end (the demo's tower)", table, targets, notes
    )
