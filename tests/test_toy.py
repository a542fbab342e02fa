"""The toy world: corpus correctness, tokenizer pitfalls (docs/design.md §5), cached deterministic builds,
and toy models that really learned their mechanisms (recomputed from the saved folders)."""

from __future__ import annotations

import itertools
import json
import random
import re
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clt_ray.toy import (
    FACTS,
    MECHANISMS,
    THRESHOLDS,
    ToyRecipe,
    build_tokenizer,
    build_toy_model,
    default_recipe,
    evaluate,
    failed_thresholds,
    iter_documents,
    mechanism_prompts,
    weights_hash,
)
from clt_ray.toy.corpus import INDUCTION_FRAMES, NONSENSE, NOUN_PAIRS, drill_tokens, is_heldout_year
from clt_ray.toy.evaluate import EVAL_SEED
from clt_ray.toy.recipe import Phase
from clt_ray.toy.train import batches

FACT_VALUE = {(f.relation, f.subject): f.value for f in FACTS}
SINGULAR = {s for s, _ in NOUN_PAIRS}
PLURAL = {p for _, p in NOUN_PAIRS}
YEAR_RANGE = re.compile(r"from the year (\d\d)(\d\d) to the year (\d\d)(\d\d)")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return list(itertools.islice(iter_documents(seed=0), 300))


def tokens_of(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text)["input_ids"])


# --- corpus ---------------------------------------------------------------------------------------


def test_corpus_is_deterministic_per_seed(docs):
    assert list(itertools.islice(iter_documents(seed=0), 300)) == docs
    assert next(iter_documents(seed=1)) != docs[0]
    for kind in MECHANISMS:
        assert mechanism_prompts(kind, 20, seed=3) == mechanism_prompts(kind, 20, seed=3)
        assert mechanism_prompts(kind, 20, seed=3) != mechanism_prompts(kind, 20, seed=4)


def test_documents_fill_the_context_with_known_tokens(tok, docs):
    for doc in docs[:50]:
        ids = tok(doc)["input_ids"]
        assert len(ids) == 128 and ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids


def test_year_ranges_always_go_forward(docs):
    ranges = [m.groups() for doc in docs for m in YEAR_RANGE.finditer(doc)]
    assert len(ranges) > 300
    for c1, y1, c2, y2 in ranges:
        assert c1 == c2 and int(y2) > int(y1)
        assert not is_heldout_year(int(c1), int(y1)), "a held-out start year leaked into training"


def test_facts_come_from_the_table(docs):
    found = 0
    for doc in docs:
        for subject, value in re.findall(r"The capital of (\w+) is (\w+)", doc):
            assert FACT_VALUE[("capital", subject)] == value
            found += 1
        for subject, value in re.findall(r"The people of (\w+) speak (\w+)", doc):
            assert FACT_VALUE[("language", subject)] == value
            found += 1
    assert found > 500
    assert 30 <= len(FACTS) <= 60 and len({(f.relation, f.subject) for f in FACTS}) == len(FACTS)


def test_agreement_follows_the_subject_not_the_distractor(docs):
    pattern = re.compile(r"The (\w+) \w+ the (\w+) (is|are) ")
    seen = {"congruent": 0, "incongruent": 0}
    for doc in docs:
        for subj, dist, verb in pattern.findall(doc):
            assert (subj in PLURAL) == (verb == "are") and (subj in SINGULAR) == (verb == "is")
            seen["congruent" if (subj in PLURAL) == (dist in PLURAL) else "incongruent"] += 1
    assert min(seen.values()) > 100


def _period(run: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest span whose repetition is `run` (a chanted span repeats in a row)."""
    return next(run[:p] for p in range(1, len(run) + 1)
                if len(run) % p == 0 and run[:p] * (len(run) // p) == run)


def test_induction_spans_are_really_repeated(tok, docs):
    pool = set(NONSENSE)
    copied = 0
    for doc in docs:
        runs, run = [], []
        for t in tokens_of(tok, doc)[:-8]:  # maximal runs of pool words (the tail may be cut)
            if t in pool:
                run.append(t)
            elif run:
                runs.append(tuple(run))
                run = []
        spans = [_period(r) for r in runs]
        for r, span in zip(runs, spans):
            if len(r) > len(span):  # a chant: 2-3 words sung 3-5 times
                assert 2 <= len(span) <= 3 and 3 <= len(r) // len(span) <= 5
            else:  # a copied span: 3-6 words, at most twice in the document
                assert 3 <= len(span) <= 6 and spans.count(span) <= 2
        # a pool word belongs to one span only, so the earlier copy of a token is unambiguous
        words = [w for s in set(spans) for w in s]
        assert len(words) == len(set(words))
        copied += sum(spans.count(s) == 2 for s in set(spans))
    assert copied >= 1.5 * len(docs)  # about two copied spans per document


def test_drills_repeat_each_span_in_a_row():
    frames = {w for f in INDUCTION_FRAMES for w in f} | {"."}
    rng = random.Random(0)
    for _ in range(50):
        toks = drill_tokens(rng, 200)
        assert len(toks) == 200 and set(toks) <= set(NONSENSE) | frames
        spans, run = [], []
        for t in toks[:-14]:  # the tail may be cut
            if t in NONSENSE:
                run.append(t)
            elif run:
                spans.append(tuple(run))
                run = []
        i, said = 0, 0
        while i < len(spans):  # each span is said 2-3 times in a row, then never again
            j = i
            while j < len(spans) and spans[j] == spans[i]:
                j += 1
            assert 6 <= len(spans[i]) <= 12 and len(set(spans[i])) == len(spans[i])
            assert 2 <= j - i <= 3 or j == len(spans)
            said += j - i
            i = j
        assert said == len(spans)


def test_curriculum_batches_follow_the_phases(tok):
    recipe = ToyRecipe(arch="gpt2", n_ctx=64, steps=10, batch_size=2, curriculum=[
        Phase(until=0.3, window=16, drills=1.0), Phase(until=1.0, window=64, drills=0.0)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = list(batches(recipe, tok))
    assert len(out) == 10
    pool = {tok.convert_tokens_to_ids(w) for w in NONSENSE}
    for step, (ids, pos) in enumerate(out):
        window = 16 if step < 3 else 64
        assert ids.shape == pos.shape == (2 * 64 // window, window)
        assert (ids[:, 0] == tok.bos_token_id).all() and (ids != tok.unk_token_id).all()
        assert (pos.diff(dim=1) == 1).all() and pos.min() >= 0 and pos.max() < 64
        if step < 3:  # drills only: mostly pool words
            assert sum(int(i) in pool for i in ids.flatten()) > 0.5 * ids.numel()
    offsets = {int(o) for _, pos in out[:3] for o in pos[:, 0]}
    assert len(offsets) > 1  # short windows sit at random offsets
    assert all((pos[:, 0] == 0).all() for _, pos in out[3:])


def test_prompts_point_at_their_evidence(tok):
    for kind in MECHANISMS:
        for p in mechanism_prompts(kind, 50, seed=0):
            toks = tokens_of(tok, p.text)
            assert toks[0] == "<bos>" and "<unk>" not in toks and len(toks) <= 128
            assert toks[p.source_position] == p.source_token
            assert p.targets and not set(p.targets) & set(p.foils)
            assert all(t in tok.get_vocab() for t in p.targets + p.foils)
            if kind == "induction":  # the current token's earlier copy is right before the target's
                assert p.targets == [p.source_token]
                assert toks[p.source_position - 1] == toks[-1]
                assert toks.count(p.source_token) == 1 and toks.count(toks[-1]) == 2
            elif kind == "greater_than":
                cc, yy = toks[p.source_position - 1], p.source_token
                assert toks[-4:] == ["to", "the", "year", cc]
                assert p.text.endswith(f"from the year {cc}{yy} to the year {cc}")
                assert is_heldout_year(int(cc), int(yy))
                assert sorted(p.targets + p.foils) == [f"{i:02d}" for i in range(100)]
                assert all(int(t) > int(yy) for t in p.targets)
            elif kind == "facts":
                relation = p.meta["relation"]
                assert p.targets == [FACT_VALUE[(relation, p.source_token)]]
            else:
                plural = p.source_token in PLURAL
                assert p.targets == (["are"] if plural else ["is"])
                assert (toks[-1] in PLURAL) != plural  # the distractor has the other number


def test_unknown_mechanism_is_named():
    with pytest.raises(ValueError, match="supported: induction, greater_than, facts, agreement"):
        mechanism_prompts("arithmetic", 3)


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_avoids_the_attribution_pitfalls(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for t in (tok, loaded):
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2, 3)
        assert len(t.all_special_ids) >= 4  # id 0 is not the only special id
        enc = t("The capital of Varnia is Tolbek.")
        assert set(enc) == {"input_ids", "attention_mask"}  # no token_type_ids
        assert enc["input_ids"][0] == t.bos_token_id  # <bos> added by the post-processor
        assert t("")["input_ids"] == [t.bos_token_id]
        assert tokens_of(t, "from the year 1732 to the year 17") == [
            "<bos>", "from", "the", "year", "17", "32", "to", "the", "year", "17"]
    for arch in ("gpt2", "llama"):
        assert len(tok) != default_recipe(arch).d_model


# --- recipe and build -----------------------------------------------------------------------------


def test_recipe_hash_and_validation():
    r = default_recipe("gpt2")
    assert r.hash() == default_recipe("gpt2").hash() != default_recipe("llama").hash()
    assert r.hash() != r.model_copy(update={"steps": r.steps + 1}).hash()
    assert "llama" not in default_recipe("llama").hash()
    with pytest.raises(ValueError, match="supported: gpt2, llama"):
        default_recipe("mamba")
    with pytest.raises(ValueError, match="supported: gpt2, llama"):
        build_toy_model("mamba")
    with pytest.raises(ValueError, match="extra"):
        ToyRecipe(arch="gpt2", stepz=3)
    with pytest.raises(ValueError, match="divisible"):
        ToyRecipe(arch="gpt2", d_model=30, n_head=4)
    with pytest.raises(ValueError, match="disagrees"):
        build_toy_model("gpt2", recipe=default_recipe("llama"))
    with pytest.raises(ValueError, match="must divide n_ctx"):
        ToyRecipe(arch="gpt2", n_ctx=64)  # the default curriculum ends with 128-token windows
    with pytest.raises(ValueError, match="end at 1.0"):
        ToyRecipe(arch="gpt2", curriculum=[Phase(until=0.5, window=32)])
    with pytest.raises(ValueError, match="increasing"):
        ToyRecipe(arch="gpt2", curriculum=[Phase(until=0.5, window=32), Phase(until=0.5, window=64),
                                           Phase(until=1.0, window=128)])


def tiny(arch: str) -> ToyRecipe:
    return ToyRecipe(arch=arch, n_layer=1, d_model=32, n_head=2, d_mlp=64, n_ctx=64, steps=3,
                     batch_size=2, warmup=1, eval_prompts=4,
                     curriculum=[Phase(until=0.5, window=32, drills=1.0), Phase(until=1.0, window=64)])


@pytest.mark.filterwarnings("ignore:.*did not learn its mechanisms")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_build_is_deterministic_and_cached(arch, tmp_path_factory):
    dirs = [tmp_path_factory.mktemp("cache") for _ in range(2)]  # no "llama" in the paths
    first = build_toy_model(arch, recipe=tiny(arch), cache_dir=dirs[0], progress=False)
    assert first.built and first.path == dirs[0] / "toy" / tiny(arch).hash()
    other = build_toy_model(arch, recipe=tiny(arch), cache_dir=dirs[1], progress=False)
    assert other.built and other.weights_hash == first.weights_hash
    again = build_toy_model(arch, recipe=tiny(arch), cache_dir=dirs[0], progress=False)
    assert not again.built and again.weights_hash == first.weights_hash
    assert weights_hash(first.path) == first.weights_hash
    saved = json.loads((first.path / "recipe.json").read_text())
    assert ToyRecipe(**saved["recipe"]) == tiny(arch) and saved["recipe_hash"] == first.recipe_hash
    assert set(json.loads((first.path / "mechanisms.json").read_text())["scores"]) == {
        f"{k}/{m}" for k in MECHANISMS for m in ("top1", "prob")}
    assert not list(first.path.parent.glob(".*.tmp"))  # no temp folder left behind
    other_seed = tiny(arch).model_copy(update={"seed": 1})
    changed = build_toy_model(arch, recipe=other_seed, cache_dir=dirs[0], progress=False)
    assert changed.path != first.path and changed.weights_hash != first.weights_hash


@pytest.mark.filterwarnings("ignore:.*did not learn its mechanisms")
def test_concurrent_builds_train_once(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_toy_model(
        "gpt2", recipe=tiny("gpt2"), cache_dir=tmp_path, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r.built for r in results) == [False, True]
    assert len({r.weights_hash for r in results}) == 1


# --- the real toy models --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["toy_gpt2", "toy_llama"])
def test_toy_models_learned_their_mechanisms(fixture, request):
    toy = request.getfixturevalue(fixture)
    assert "llama" not in str(toy.path.relative_to(toy.path.parent.parent))
    assert weights_hash(toy.path) == toy.weights_hash
    model = AutoModelForCausalLM.from_pretrained(toy.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.path)
    assert model.config.vocab_size == len(tokenizer) != model.config.hidden_size
    if toy.arch == "gpt2":
        assert model.config.n_ctx == model.config.n_positions == toy.recipe.n_ctx
        assert json.loads((toy.path / "config.json").read_text())["n_ctx"] == toy.recipe.n_ctx
    # the saved scores are what the saved folder really does
    recomputed = evaluate(model, tokenizer, n=toy.recipe.eval_prompts, seed=EVAL_SEED)
    for key, value in toy.scores.items():  # a near tie may flip one prompt (another thread count)
        assert recomputed[key] == pytest.approx(value, abs=0.011 if "top1" in key else 2e-3), key
    # they meet the bars on the build's 200 held-out prompts per mechanism
    assert failed_thresholds(toy.scores) == [], toy.scores
    # and, within sampling error (100 prompts), on another fresh draw of held-out prompts
    fresh = evaluate(model, tokenizer, n=100, seed=7)
    for key, bar in THRESHOLDS.items():
        assert fresh[key] >= bar - 0.05, (key, fresh)
