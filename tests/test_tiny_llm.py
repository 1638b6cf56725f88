"""The small LM: a standard HF checkpoint that loads offline, trains, and is reproducible."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from embed.prompts import CONTEXT_SUFFIX, LONG_FACETS, LONG_PREFIX
from eval.tiny_llm import IGNORE, TinyLLMConfig, build_tiny_llm, pack_prompt
from store.errors import InputError

# Small enough that the whole module runs in seconds on 2 cores.
SMALL = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    n_captions=40,
    batch_tokens=1024,
)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Two untrained and two briefly trained models, built with the same seed."""
    root = tmp_path_factory.mktemp("tiny_llm")
    reports = {}
    for name, steps in [
        ("untrained", 0),
        ("untrained_again", 0),
        ("trained", 30),
        ("trained_again", 30),
    ]:
        reports[name] = build_tiny_llm(
            root / name, TinyLLMConfig(steps=steps, **SMALL), progress=False
        )
    return root, reports


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_untrained_model_loads_offline_as_llama(tiny_dirs, offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, reports = tiny_dirs
    model = AutoModelForCausalLM.from_pretrained(root / "untrained")
    tok = AutoTokenizer.from_pretrained(root / "untrained")
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.max_position_embeddings >= 2048
    assert model.config.head_dim * model.config.num_attention_heads == model.config.hidden_size
    assert model.config.num_key_value_heads == 2
    assert (root / "untrained" / "model.safetensors").is_file()
    assert reports["untrained"].initial_loss is None and reports["untrained"].steps == 0
    assert reports["untrained"].n_params == model.num_parameters()

    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    assert None not in ids.values() and len(set(ids.values())) == 3
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.config.vocab_size == len(tok)

    text = LONG_PREFIX + "A red star." + CONTEXT_SUFFIX + LONG_FACETS["main_object"]
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in plain  # facetclip adds BOS itself
    assert tok(text)["input_ids"] == [tok.bos_token_id, *plain]
    with torch.no_grad():
        out = model(torch.tensor([[tok.bos_token_id, *plain]]))
    assert out.logits.shape == (1, len(plain) + 1, len(tok))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    "text", ["Ein roter Stern über dem Fluss.", "红色的星星", "Звезда — 🌟 ok", "naïve café"]
)
def test_any_unicode_round_trips(tiny_dirs, offline, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0] / "untrained")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_prompt_words_are_whole_tokens(tiny_dirs, offline):
    """The tokenizer was trained on the prompts, so they are short sequences of whole words."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0] / "untrained")
    facet = LONG_FACETS["main_object"]
    assert len(tok(facet, add_special_tokens=False)["input_ids"]) <= len(facet.split()) + 3


def test_short_training_lowers_the_loss(tiny_dirs):
    root, reports = tiny_dirs
    report = reports["trained"]
    assert report.steps == 30
    assert report.final_loss < report.initial_loss
    log = json.loads((root / "trained" / "training_log.json").read_text())
    assert log["steps"] == 30
    assert log["initial_loss"] == report.initial_loss and log["final_loss"] == report.final_loss
    assert log["final_answer_loss"] < log["initial_answer_loss"]
    assert log["config"]["hidden_size"] == SMALL["hidden_size"]
    assert log["seconds"] > 0


@pytest.mark.parametrize("a, b", [("untrained", "untrained_again"), ("trained", "trained_again")])
def test_same_seed_same_tokenizer_and_weights(tiny_dirs, a, b):
    root, _ = tiny_dirs
    assert (root / a / "tokenizer.json").read_bytes() == (root / b / "tokenizer.json").read_bytes()
    wa, wb = load_file(root / a / "model.safetensors"), load_file(root / b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_refuses_non_empty_out_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    cfg = TinyLLMConfig(steps=0, **SMALL)
    with pytest.raises(InputError, match="--overwrite"):
        build_tiny_llm(tmp_path, cfg, progress=False)
    cfg.overwrite = True
    assert build_tiny_llm(tmp_path, cfg, progress=False).out == tmp_path
    assert (tmp_path / "config.json").is_file()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(steps=-1), "steps must be in 0"),
        (dict(hidden_size=30), "hidden_size must be"),
        (dict(num_kv_heads=3), "num_kv_heads must divide"),
        (dict(num_layers=0), "num_layers must be in 1"),
        (dict(vocab_size=100), "vocab_size must be in 300"),
        (dict(lr=0.0), "lr must be in"),
        (dict(batch_tokens=10), "batch_tokens must be in 256"),
        (dict(row_tokens=8), "row_tokens must be in 16"),
        (dict(answer_weight=-1.0), "answer_weight must be in 0"),
        (dict(sketches=-1), "sketches must be in 0"),
        (dict(prefixed=101), "prefixed must be in 0"),
        (dict(probe_n=2), "probe_n must be 0 .no probe. or in 4"),
        (dict(probe_every=-5), "probe_every must be in 0"),
        (dict(probe_every=5), "probe_every needs held-out captions"),
    ],
)
def test_bad_config_is_refused_with_the_allowed_range(tmp_path, change, match):
    cfg = TinyLLMConfig(**{**SMALL, **change})
    with pytest.raises(InputError, match=match):
        build_tiny_llm(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_pack_prompt_targets_and_answer_weights():
    """Each facet predicts its own next tokens; answers (and only answers) carry the weight."""
    item = pack_prompt([1, 10, 11], [[20, 21], [30]], [[40, 2], [50, 2]], answer_weight=5.0)
    assert item.ids == (1, 10, 11, 20, 21, 40, 2, 30, 50, 2)
    assert item.item == (0,) * 10
    assert item.segment == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2)
    assert item.position == (0, 1, 2, 3, 4, 5, 6, 3, 4, 5)
    assert item.target == (10, 11, 20, 21, 40, 2, IGNORE, 50, 2, IGNORE)
    assert item.weight == (1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 0.0, 5.0, 5.0, 0.0)


def test_packed_rows_match_standalone_sequences(tiny_dirs, offline):
    """Training and the probe pack several prompts per row and facets behind a block mask;
    every facet must still see exactly its standalone sequence ``context + facet``
    (DESIGN.md's definition), whatever shares its row or batch."""
    from transformers import AutoModelForCausalLM

    from eval.tiny_llm import collate, join_items

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[0] / "trained").eval()
    context, facets = [1, 40, 41, 42, 43], [[50, 51], [60, 61, 62], [70]]
    row = join_items([pack_prompt([1, 44], [[52]]), pack_prompt(context, facets)])
    batch = collate([row, pack_prompt([1, 45, 46])], pad_id=0)
    with torch.no_grad():
        packed = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state

        def alone(ids):
            return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]

        torch.testing.assert_close(packed[0, 2], alone([1, 44, 52]), rtol=1e-5, atol=1e-5)
        end = 3 + len(context)
        for facet in facets:
            end += len(facet)
            torch.testing.assert_close(
                packed[0, end - 1], alone(context + facet), rtol=1e-5, atol=1e-5
            )
        torch.testing.assert_close(packed[1, 2], alone([1, 45, 46]), rtol=1e-5, atol=1e-5)


def test_regrouped_rows_train_the_same_loss_in_shorter_rows(tiny_dirs, offline):
    """Training regroups a batch's prompts into rows of at most row_tokens (attention costs
    the square of a row's length): every prompt lands whole in one row, no row outgrows the
    cap unless one prompt does alone, and every predicted token's loss is the one it had in
    the sample's own row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.tiny_llm import (
        _Encoder,
        _synth_samples,
        collate,
        regroup,
        token_losses,
        training_rows,
    )

    root = tiny_dirs[0]
    model = AutoModelForCausalLM.from_pretrained(root / "trained").eval()
    enc = _Encoder(AutoTokenizer.from_pretrained(root / "trained"))
    rows = training_rows(_synth_samples(3, seed=5), enc, 16.0, seed=0, sketches=2, prefixed=2)
    prompt_count = sum(len(set(r.item)) for r in rows)
    cap = max(r.item.count(k) for r in rows for k in set(r.item)) + 10  # the longest prompt's
    short = regroup(rows, cap)
    assert sum(len(set(r.item)) for r in short) == prompt_count
    assert sum(len(r.ids) for r in short) == sum(len(r.ids) for r in rows)
    assert all(len(r.ids) <= cap for r in short) and len(short) > len(rows)
    # a prompt longer than the cap gets a row of its own
    tight = regroup(rows, 16)
    assert sum(len(set(r.item)) for r in tight) == prompt_count
    assert all(len(r.ids) <= 16 or len(set(r.item)) == 1 for r in tight)

    def losses(batch_rows):  # prompt ids -> its tokens' losses (as trained: weight > 0)
        batch = collate(batch_rows, pad_id=0)
        with torch.no_grad():
            ce = token_losses(model, batch)
        out = {}
        for b, r in enumerate(batch_rows):
            for k in set(r.item):
                where = [i for i, item in enumerate(r.item) if item == k]
                ids = r.ids[where[0] : where[-1] + 1]
                out[ids] = [float(ce[b, i]) for i in where if r.weight[i] > 0]
        return out

    joined, regrouped = losses(rows), losses(short)
    assert joined.keys() == regrouped.keys()
    for ids, value in joined.items():
        assert regrouped[ids] == pytest.approx(value, abs=1e-5)


def test_an_answer_is_a_token_its_caption_holds(tiny_dirs):
    """Answers are trained as `:" star"`, with the space: answering a facet is then copying a
    token of the caption (a byte-level BPE gives " star" and "star" different ids)."""
    from transformers import AutoTokenizer

    from eval.tiny_llm import (
        ANSWER_SPACE,
        PROBE_FACETS,
        _rich_sketch_caption,
        _sketch_caption,
        _synth_samples,
    )

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0] / "untrained")
    rng = random.Random(0)
    for s in _synth_samples(30, seed=0, start=5000):
        for text in (s.long_caption, _sketch_caption(s, rng), _rich_sketch_caption(s, rng)):
            held = set(tok(text, add_special_tokens=False)["input_ids"])
            for facet in PROBE_FACETS:
                word = s.answers[facet]
                if word == "nothing":  # no minor object: the answer is not in the caption
                    continue
                first = tok(ANSWER_SPACE + word + '"', add_special_tokens=False)["input_ids"][0]
                assert first in held, (facet, word, text)


def test_the_cli_prints_the_probe_it_logs(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from eval.tiny_llm import PROBE_FACETS

    out = tmp_path / "tiny"
    args = ["tiny-llm", str(out), "--steps", "0", "--hidden-size", "32", "--layers", "1"]
    r = CliRunner().invoke(app, [*args, "--probe", "12"])
    assert r.exit_code == 0, r.output
    logged = json.loads((out / "training_log.json").read_text())["probe_untrained"]
    printed = " ".join(r.output.split())
    assert "facet probe (nearest centroid, 12 held-out long captions; untrained)" in printed
    for facet in PROBE_FACETS:
        assert f"{facet} {logged[facet]:.2f}" in printed


def test_prefixed_documents_put_a_sketch_before_a_caption_opening(tiny_dirs):
    """``prefixed`` adds, per sample, that many ``<s>sketch</s><s>opening`` documents: the
    opening of the sample's short or long caption, trained as next-token prediction that may
    attend to the sketch (one item, segment 0), so the LM learns to use what precedes BOS."""
    from transformers import AutoTokenizer

    from eval.tiny_llm import (
        PREFIXED_TOKENS,
        _Encoder,
        _synth_samples,
        attention_allowed,
        training_rows,
    )

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0] / "untrained")
    enc = _Encoder(tok)
    samples = _synth_samples(6, seed=0, start=5000)
    plain = training_rows(samples, enc, 4.0, seed=0, sketches=1, prefixed=0)
    rows = training_rows(samples, enc, 4.0, seed=0, sketches=1, prefixed=2)
    for s, row, base in zip(samples, rows, plain, strict=True):
        assert max(row.item) == max(base.item) + 2
        for n in (max(row.item) - 1, max(row.item)):
            at = [i for i, it in enumerate(row.item) if it == n]
            ids = [row.ids[i] for i in at]
            starts = [i for i, t in enumerate(ids) if t == tok.bos_token_id]
            assert starts[0] == 0 and len(starts) == 2 and ids[starts[1] - 1] == tok.eos_token_id
            # the opening: the first PREFIXED_TOKENS of the short or the long caption, ended
            # by EOS only when the whole caption fits (a cut document has no end)
            opening = ids[starts[1] + 1 :]
            whole = [
                t + [tok.eos_token_id] if len(t) <= PREFIXED_TOKENS else t[:PREFIXED_TOKENS]
                for t in (enc(s.short_caption), enc(s.long_caption))
            ]
            assert opening in whole
            sketch = tok.decode(ids[1 : starts[1] - 1])
            assert s.answers["main_object"] in sketch
            assert [row.segment[i] for i in at] == [0] * len(at)
            assert [row.position[i] for i in at] == list(range(len(at)))
            assert [row.target[i] for i in at[:-1]] == ids[1:]
            item = torch.tensor([row.item])
            allowed = attention_allowed(item, torch.tensor([row.segment]))[0]
            # the opening's last token sees the whole sketch, and nothing of other items
            assert allowed[at[-1], at[0] : at[-1] + 1].all()
            assert not allowed[at[-1], : at[0]].any()


def test_probe_every_logs_when_each_facet_is_learnt(tmp_path):
    from eval.tiny_llm import PROBE_FACETS

    cfg = TinyLLMConfig(steps=6, probe_n=8, probe_every=2, **SMALL)
    build_tiny_llm(tmp_path / "m", cfg, progress=False)
    log = json.loads((tmp_path / "m" / "training_log.json").read_text())
    # steps 2 and 4 (the probe after step 6 is probe_trained)
    assert [step for step, _ in log["probe_curve"]] == [2, 4]
    for _, probe in log["probe_curve"]:
        assert set(probe) == set(PROBE_FACETS) and all(0 <= v <= 1 for v in probe.values())
    assert set(log["probe_trained"]) == set(PROBE_FACETS)
    # probing does not touch training: the same weights as a run that probes only at the end
    build_tiny_llm(tmp_path / "plain", TinyLLMConfig(steps=6, probe_n=8, **SMALL), progress=False)
    plain = json.loads((tmp_path / "plain" / "training_log.json").read_text())
    assert "probe_curve" not in plain and plain["probe_trained"] == log["probe_trained"]
    wa = load_file(tmp_path / "m" / "model.safetensors")
    wb = load_file(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
