"""clt_ray.eval.metrics: EV / nMSE / L0 / dead features against hand computations, and the splice.

Splice checks on tiny random-weight models built in memory:
- a GPT-2 whose MLP is linear and whose pre-MLP norm is the identity: a ReLU CLT with features ±x_i
  reproduces every MLP exactly, so ΔCE ≈ 0, KL ≈ 0, EV = 1 (both hook pairs);
- a random CLT against an independent reference that splices one layer per forward pass (each
  layer's CLT input read with the earlier layers already replaced), through the whole-CLT
  encode/decode rather than the per-layer code in metrics.py; and that reference differs from
  splicing with clean-run inputs, so the test would catch reading the wrong pass;
- a CLT with zero decoder equals the zero ablation; a random CLT on text sampled from the model
  itself gives ΔCE > 0 (in expectation ΔCE = KL ≥ 0 there).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from clt_ray.config import CLTConfig
from clt_ray.eval.metrics import (
    ReconstructionStats,
    dead_features,
    evaluate,
    explained_variance,
    l0_per_layer,
    normalized_mse,
)
from clt_ray.lm import hook_module, keep_mask
from clt_ray.nn.clt import CrossLayerTranscoder

V, D, L, T = 61, 16, 3, 10


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: with 2 threads on 2 shared, busy cores, OpenMP hand-offs made these tests ~7×
    slower (40 s vs 6 s here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- hand computations ---------------------------------------------------------------------------


def test_explained_variance_and_nmse_by_hand():
    torch.manual_seed(0)
    y = torch.randn(50, 2, 4, dtype=torch.float64) + 3
    assert torch.allclose(explained_variance(y, y), torch.ones(2, dtype=torch.float64))
    mean = y.mean(0, keepdim=True).expand_as(y)
    assert torch.allclose(explained_variance(y, mean), torch.zeros(2, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(normalized_mse(y, torch.zeros_like(y)), torch.ones(2, dtype=torch.float64))
    y_hat = y + 0.5 * torch.randn_like(y)
    for l in range(2):  # literal sums over tokens and dimensions
        err = sum(float(((y[t, l] - y_hat[t, l]) ** 2).sum()) for t in range(50))
        var = sum(float(((y[t, l] - y[:, l].mean(0)) ** 2).sum()) for t in range(50))
        ss = sum(float((y[t, l] ** 2).sum()) for t in range(50))
        assert explained_variance(y, y_hat)[l].item() == pytest.approx(1 - err / var, rel=1e-9)
        assert normalized_mse(y, y_hat)[l].item() == pytest.approx(err / ss, rel=1e-9)


def test_l0_by_hand():
    acts = torch.zeros(4, 2, 5)
    acts[0, 0, :3] = 1.0  # token 0, layer 0: 3 active
    acts[1, 0, 4] = -2.0  # nonzero counts, whatever its sign
    acts[2, 1, :] = 0.5  # token 2, layer 1: 5 active
    assert l0_per_layer(acts).tolist() == [4 / 4, 5 / 4]


def test_streaming_stats_do_not_depend_on_batching():
    torch.manual_seed(1)
    y = torch.randn(37, 3, 8) * torch.tensor([1.0, 5.0, 0.1])[:, None] + 2
    y_hat = y + 0.3 * torch.randn_like(y)
    acts = torch.relu(torch.randn(37, 3, 6) - 1)
    whole = ReconstructionStats(3, 6)
    whole.update(y, y_hat, acts)
    parts = [ReconstructionStats(3, 6) for _ in range(3)]
    for p, sl in zip(parts, [slice(0, 5), slice(5, 6), slice(6, 37)]):
        p.update(y[sl], y_hat[sl], acts[sl])
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    a, b = whole.result(), parts[0].result()
    for key in ("explained_variance", "nmse", "l0"):
        assert a[key] == pytest.approx(b[key], rel=1e-10)
        assert a[key] == pytest.approx(b[key], rel=1e-10)
    assert a["explained_variance"] == pytest.approx(explained_variance(y, y_hat).tolist())
    assert a["nmse"] == pytest.approx(normalized_mse(y, y_hat).tolist())
    assert a["l0"] == pytest.approx(l0_per_layer(acts).tolist())
    err, var = (y - y_hat).double().square().sum(), (y - y.mean(0)).double().square().sum(dim=(0, 2))
    assert a["explained_variance_total"] == pytest.approx(1 - float(err / var.sum()))
    assert (whole.fire_counts == (acts != 0).sum(0)).all()


def test_dead_features_are_global_over_shards():
    counts = torch.tensor([[0, 3, 0, 1, 0, 7], [2, 0, 0, 5, 1, 1]])
    whole = dead_features(counts)
    assert whole == {"dead": 5, "dead_per_layer": [3, 2], "n_features": 12,
                     "dead_fraction": 5 / 12}
    shards = [counts[:, :2], counts[:, 2:3], counts[:, 3:]]
    assert dead_features(shards) == whole
    assert dead_features({3: shards[2], 0: shards[0], 2: shards[1]}) == whole
    with pytest.raises(ValueError, match="tile"):
        dead_features({0: shards[0], 3: shards[2]})
    since = torch.tensor([[10, 0, 99], [100, 3, 5]])  # steps since last fired
    assert dead_features(since, window=10)["dead_per_layer"] == [2, 1]


# --- tiny models ---------------------------------------------------------------------------------


def tiny_gpt2(linear: bool = False, seed: int = 0) -> GPT2LMHeadModel:
    """A random GPT-2; linear=True: identity activation and no pre-MLP norm, so the MLP is an
    affine map of hook_resid_mid (and of mlp.hook_in)."""
    cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=2, n_positions=64, n_inner=24,
                     activation_function="linear" if linear else "gelu_new")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if linear:
        for block in model.transformer.h:
            block.ln_2 = nn.Identity()
    return model.eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=L,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def sample_windows(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """n windows of T tokens sampled from the model itself, each starting with BOS (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 1, dtype=torch.long)
    for _ in range(T - 1):
        probs = model(input_ids=ids).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return ids


def random_clt(activation: str = "jumprelu", seed: int = 0, scale: float = 1.0, **kw):
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=40, activation=activation, seed=seed, **kw)
    clt = CrossLayerTranscoder(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.5)
        clt.b_dec.normal_(0, 0.3 * scale)
        for w in clt.W_dec:
            w.normal_(0, 0.3 * scale)
        clt.s_in.uniform_(0.5, 2)  # normalisation must be applied on the way in and out
        clt.s_out.uniform_(0.5, 2)
    return clt


def exact_clt(model: GPT2LMHeadModel) -> CrossLayerTranscoder:
    """A ReLU CLT equal to a linear GPT-2's MLPs: features relu(±x_i), decoder rows ±(W_fc W_proj)_i,
    no cross-layer terms; normalisation scales ≠ 1 folded in so they are exercised too."""
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=2 * D, activation="relu")
    clt = CrossLayerTranscoder(cfg)
    eye = torch.eye(D)
    with torch.no_grad():
        clt.s_in.copy_(torch.tensor([0.5, 2.0, 1.5]))
        clt.s_out.copy_(torch.tensor([3.0, 0.25, 1.0]))
        clt.b_enc.zero_()
        for l, block in enumerate(model.transformer.h):
            mlp = block.mlp
            M = mlp.c_fc.weight @ mlp.c_proj.weight  # Conv1D: y = x W + b
            clt.W_enc[l] = torch.cat([eye, -eye]) / clt.s_in[l]
            clt.W_dec[l].zero_()
            clt.W_dec[l][:, 0] = torch.cat([M, -M]) * clt.s_out[l]
            clt.b_dec[l] = (mlp.c_fc.bias @ mlp.c_proj.weight + mlp.c_proj.bias) * clt.s_out[l]
    return clt


# --- splice ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_hook", ["hook_resid_mid", "mlp.hook_in"])
def test_exact_clt_splices_to_zero_delta(input_hook):
    model = tiny_gpt2(linear=True)
    clt = exact_clt(model)
    windows = sample_windows(model, 8)
    r = evaluate(clt, model, windows, input_hook=input_hook, batch_size=3)
    assert r["n_tokens"] == 8 * (T - 1)  # BOS left out
    assert r["n_predictions"] == 8 * (T - 2)
    assert r["explained_variance"] == pytest.approx([1.0] * L, abs=1e-5)
    assert r["nmse"] == pytest.approx([0.0] * L, abs=1e-5)
    assert abs(r["delta_ce"]) < 1e-4 and r["kl_spliced"] < 1e-5
    assert r["ce_zero_ablation"] > r["ce_clean"] + 0.05  # the reference point is informative
    assert r["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert r["bos_spliced"] is False


def _splice_reference(clt, model, ids, in_hook, out_hook, from_clean_run=False):
    """CE and KL of the spliced run, one layer decided per forward pass (module docstring)."""
    keep = keep_mask(ids)
    fixed: dict[int, torch.Tensor] = {}

    def run():
        xs, handles = {}, []
        for l in range(L):
            mod, side = hook_module(model, l, in_hook)
            if side == "input":
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, l=l: xs.__setitem__(l, a[0][keep])))
            else:
                handles.append(mod.register_forward_hook(
                    lambda m, a, o, l=l: xs.__setitem__(l, o[keep])))
            if l in fixed:
                def replace(m, a, o, l=l):
                    o = o.clone()
                    o[keep] = fixed[l]
                    return o
                handles.append(hook_module(model, l, out_hook)[0].register_forward_hook(replace))
        logits = model(input_ids=ids).logits
        for h in handles:
            h.remove()
        return torch.stack([xs[l] for l in range(L)], dim=1), logits

    def clt_out(x):
        xn, _ = clt.normalize(x)
        return clt.decode(clt.encode(xn)[1]) / clt.s_out[:, None]

    with torch.no_grad():
        x, clean = run()
        if from_clean_run:
            y_hat = clt_out(x)
            fixed.update({l: y_hat[:, l] for l in range(L)})
        else:
            for k in range(L):
                fixed[k] = clt_out(run()[0])[:, k]
        _, spliced = run()
    valid = keep[:, :-1]
    lp_c = clean[:, :-1][valid].log_softmax(-1)
    lp_s = spliced[:, :-1][valid].log_softmax(-1)
    tgt = ids[:, 1:][valid][:, None]
    ce = float(-lp_s.gather(1, tgt).mean())
    kl = float((lp_c.exp() * (lp_c - lp_s)).sum(-1).mean())
    return ce, kl


@pytest.mark.parametrize("arch,activation,k", [("gpt2", "jumprelu", None), ("gpt2", "topk", 4),
                                               ("llama", "relu", None)])
def test_splice_matches_layer_by_layer_reference(arch, activation, k):
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    clt = random_clt(activation, k=k)
    windows = sample_windows(model, 6, seed=2)
    r = evaluate(clt, model, windows, batch_size=6)
    ce, kl = _splice_reference(clt, model, windows, "hook_resid_mid", "hook_mlp_out")
    assert r["ce_spliced"] == pytest.approx(ce, rel=1e-5, abs=1e-6)
    assert r["kl_spliced"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    ce_clean_inputs, _ = _splice_reference(clt, model, windows, "hook_resid_mid", "hook_mlp_out",
                                           from_clean_run=True)
    assert abs(ce_clean_inputs - ce) > 1e-3  # errors compound: the reference is discriminating


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_decoder_equals_zero_ablation_and_random_clt_hurts(arch):
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    windows = sample_windows(model, 16, seed=3)
    clt = random_clt()
    with torch.no_grad():
        clt.b_dec.zero_()
        for w in clt.W_dec:
            w.zero_()
    r = evaluate(clt, model, windows, batch_size=8)
    assert r["ce_spliced"] == pytest.approx(r["ce_zero_ablation"], abs=1e-6)
    assert r["kl_spliced"] == pytest.approx(r["kl_zero_ablation"], abs=1e-6)
    assert r["ce_recovered"] == pytest.approx(0.0, abs=1e-5)

    r = evaluate(random_clt(scale=3.0, seed=5), model, windows, batch_size=8)
    assert r["delta_ce"] > 0.01 and r["kl_spliced"] > 0.01
    assert r["explained_variance_total"] < 0.5
    for key, value in r.items():  # JSON-able: plain numbers, strings, lists
        assert isinstance(value, (int, float, str, list, bool)), key
        if isinstance(value, float):
            assert math.isfinite(value), key


def test_evaluate_accepts_padding_batches_and_counters():
    model = tiny_gpt2()
    clt = random_clt("relu")
    ids = sample_windows(model, 4, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: those positions are neither reconstructed nor predicted
    ids = ids.masked_fill(mask == 0, 1)
    r = evaluate(clt, model, [(ids[:2], mask[:2]), {"input_ids": ids[2:], "attention_mask": mask[2:]}],
                 fired_counters=[torch.ones(L, 10), torch.zeros(L, 30)])
    assert r["n_tokens"] == 4 * (T - 1) - (T - 6)
    assert r["n_predictions"] == 4 * (T - 2) - (T - 6)
    assert r["dead_training"] == 30 * L and r["dead_training_per_layer"] == [30] * L
    assert r["n_batches"] == 2
    whole = evaluate(clt, model, ids, attention_mask=mask, batch_size=4, splice=False)
    assert whole["explained_variance"] == pytest.approx(r["explained_variance"], rel=1e-6)
    assert "delta_ce" not in whole
    with pytest.raises(ValueError, match="shard"):
        evaluate(clt.shard(0, 20), model, ids)


# --- the eval command on a checkpoint ------------------------------------------------------------


def make_run(tmp_path, activation: str = "jumprelu", k: int | None = None):
    """A tiny GPT-2 HF folder with a word-level tokenizer, a .jsonl corpus, and a checkpoint of a
    random CLT whose run config names both. Returns (checkpoint path, config, CLT)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from clt_ray.config import Config, DataConfig, ModelConfig, TrainConfig
    from clt_ray.train.checkpoint import TrainingState, save_checkpoint

    folder = tmp_path / "model"
    tiny_gpt2().save_pretrained(folder)
    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                            pad_token="<pad>", unk_token="<unk>",
                            model_input_names=["input_ids", "attention_mask"]
                            ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(7)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"text": " ".join(f"w{int(i)}" for i in torch.randint(3, V, (25,),
                                                                          generator=gen))}) + "\n"
        for _ in range(12)))
    cfg = Config(model=ModelConfig(name=str(folder)),
                 data=DataConfig(corpus=str(corpus), context_size=12, heldout_every=2,
                                 heldout_tokens=60, lm_batch_size=4),
                 train=TrainConfig(batch_size=10, dead_after_tokens=100))
    clt = random_clt(activation, k=k)
    since = torch.zeros(L, 40, dtype=torch.long)
    since[:, :5] = 100  # 5 dead features per layer
    state = TrainingState(step=7, total_steps=10, tokens_since_fired=since)
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "step_000000007", clt,
                           state=state, config=cfg)
    return path, cfg, clt


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`clt-ray ARGS` as the console script runs it: (exit code, stdout, stderr)."""
    import sys

    from clt_ray.cli import main

    monkeypatch.setattr(sys, "argv", ["clt-ray", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_command_on_a_checkpoint(tmp_path):
    import json

    from click.testing import CliRunner

    from clt_ray.cli import cli
    from clt_ray.data import heldout_windows
    from clt_ray.lm import load_model

    path, cfg, clt = make_run(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["eval", str(tmp_path / "run"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["checkpoint"] == str(path) and r["step"] == 7
    assert r["dead_training_per_layer"] == [5] * L
    model, tokenizer = load_model(cfg.model)
    ids, mask = heldout_windows(tokenizer, cfg.data)
    direct = evaluate(clt, model, ids, attention_mask=mask, batch_size=4)
    assert r["n_tokens"] == direct["n_tokens"] >= 60
    assert r["explained_variance"] == pytest.approx(direct["explained_variance"], rel=1e-5)
    assert r["delta_ce"] == pytest.approx(direct["delta_ce"], rel=1e-5, abs=1e-6)

    res = runner.invoke(cli, ["eval", str(path), "--batches", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for text in ("EV", "nMSE", "L0", "dead(training)", "ΔCE", "recovered", "KL(clean‖spliced)"):
        assert text in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip().startswith(("0 ", "1 ", "2 "))
                ]) == L


def add_newer_checkpoint(tmp_path, path, cfg, clt, step: int = 9):
    """A second checkpoint of the same CLT at a later step, next to make_run's."""
    from clt_ray.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(path).state
    state.step = step
    return save_checkpoint(path.parent / f"step_{step:09d}", clt, state=state, config=cfg)


@pytest.mark.parametrize("damage", ["truncated", "deleted", "half-written manifest"])
def test_eval_skips_a_damaged_latest_checkpoint_saying_so(tmp_path, monkeypatch, capsys, damage):
    import json

    path, cfg, clt = make_run(tmp_path)
    newer = add_newer_checkpoint(tmp_path, path, cfg, clt)
    file = {"truncated": "W_dec_1.safetensors", "deleted": "W_enc_2.safetensors",
            "half-written manifest": "manifest.json"}[damage]
    if damage == "deleted":
        (newer / file).unlink()
    else:
        (newer / file).write_bytes((newer / file).read_bytes()[:50])
    code, out, err = run_main(monkeypatch, capsys, "eval", str(tmp_path / "run"), "--json",
                              "--batches", "1", "--no-splice")
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(path) and json.loads(out)["step"] == 7
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("warning: ") for ln in lines), err
    assert newer.name in lines[0] and file in lines[0] and str(path) in lines[1]
    code, out, err = run_main(monkeypatch, capsys, "eval", str(newer))  # named: an error
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: ") and file in err


def test_eval_of_a_checkpoint_with_an_edited_n_features_is_an_error(tmp_path, monkeypatch,
                                                                     capsys):
    import json

    path, _, _ = make_run(tmp_path)  # 40 features per layer
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["clt"]["n_features"] = 20
    (path / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_main(monkeypatch, capsys, "eval", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"W_enc_0.safetensors: tensor W_enc_0 has shape [40, {D}]" in err
    assert f"[20, {D}]" in err


def test_eval_device_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    import clt_ray.eval.metrics as metrics_mod

    make_run(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(metrics_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for device, says in (("banana", "device 'banana' is not a torch device"),
                         ("cuda", "device cuda asked for but torch sees no CUDA device"),
                         ("cuda:1", "device cuda:1 asked for but torch sees no CUDA device")):
        code, out, err = run_main(monkeypatch, capsys, "eval", str(tmp_path / "run"),
                                  "--device", device)
        assert (code, out, err.strip()) == (2, "", f"Error: {says}")
