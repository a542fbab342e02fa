"""`clt-ray plan` (clt_ray/plan.py): its sizes against hand-computed formulas and against what the
code really builds and writes (the CLT module, a saved checkpoint, an encoded cache block, the
HF models on the meta device), the shard-count choice, the profile estimate and the CLI."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from clt_ray.config import CLTConfig, OptimConfig
from clt_ray.errors import CltRayError
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.nn.step import make_optimizer
from clt_ray.plan import (
    ACT_COPIES,
    BATCH_COPIES,
    BUILTIN,
    RESERVED,
    SLACK,
    LMShape,
    PlanError,
    cache_bytes_per_token,
    checkpoint_bytes,
    clt_params,
    divisors,
    lm_shape,
    load_profile,
    make_plan,
    parse_size,
    readme_table,
    shape_from_hf_config,
    shard_memory,
    smallest_shards,
    step_flops,
    toy_shape,
)
from clt_ray.train.checkpoint import TrainingState, save_checkpoint

L, D, F = 3, 8, 12  # a small CLT computed by hand below


# --- the CLT's sizes ---------------------------------------------------------------------------


def test_clt_params_are_the_hand_formula_and_the_modules_count():
    # W_enc L·F·d, W_dec F·d·L(L+1)/2, b_enc L·F, log θ L·F (JumpReLU), b_dec L·d
    hand = L * F * D + F * D * L * (L + 1) // 2 + L * F + L * F + L * D
    assert hand == 288 + 576 + 36 + 36 + 24
    assert clt_params(L, D, F)["total"] == hand
    assert clt_params(L, D, F, "relu")["total"] == hand - L * F  # no threshold
    for activation, k in (("jumprelu", None), ("relu", None), ("topk", 2)):
        cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, activation=activation, k=k)
        whole = CrossLayerTranscoder(cfg)
        assert sum(p.numel() for p in whole.parameters()) == clt_params(L, D, F, activation)["total"]
        shard = CrossLayerTranscoder(cfg, 4, 8)  # a shard holds its rows and a copy of b_dec
        assert sum(p.numel() for p in shard.parameters()) == clt_params(L, D, 4, activation)["total"]


def _tensor_bytes(path: Path) -> int:
    """Bytes of a safetensors file's tensor data: the file less its 8-byte length and header."""
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def test_checkpoint_bytes_match_a_saved_checkpoint(tmp_path):
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F))
    opt = make_optimizer(clt, OptimConfig())
    for p in clt.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # Adam now holds both moments of every parameter
    state = TrainingState(step=1, tokens_since_fired=torch.zeros(L, F, dtype=torch.int64))
    path = save_checkpoint(tmp_path / "ck", clt, opt, state)
    files = sorted(path.rglob("*.safetensors"))
    predicted = checkpoint_bytes(L, D, F)
    assert sum(_tensor_bytes(f) for f in files) == predicted["total"]
    overhead = sum(f.stat().st_size for f in files) - predicted["total"]
    assert 0 < overhead <= 1024 * len(files)  # headers only
    assert predicted["weights"] == 4 * clt_params(L, D, F)["total"]
    assert predicted["adam"] == 2 * predicted["weights"]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cache_bytes_per_token_match_encoded_blocks(bits):
    from clt_ray.cache.block import encode_block

    layers, d = 3, 10  # 10·4/8 and 10·2/8 are not whole bytes: packing pads each layer's row
    per_token = cache_bytes_per_token(layers, d, bits)
    assert per_token == 4 + 2 * layers * (math.ceil(d * bits / 8) + 2)
    sizes = {}
    for T in (64, 128):
        g = torch.Generator().manual_seed(T)
        x, y = (torch.randn(T, layers, d, generator=g) for _ in range(2))
        sizes[T] = len(encode_block(torch.arange(T), x, y, bits, zstd_level=None))
    assert sizes[128] - sizes[64] == 64 * per_token  # every token costs exactly this
    assert 0 < sizes[64] - 64 * per_token < 4096  # plus the Arrow schema and framing, once


def test_step_flops_by_hand():
    # encoder 2·B·L·F·d forward + as much for ∂W_enc; decoder 2·B·F·d·L(L+1)/2 forward, ×2 back
    assert step_flops(2, 3, 5, 7) == 2 * (2 * 7 * 2 * 5 * 3) + 3 * (2 * 7 * 5 * 3 * 3)


# --- the language model's shape ----------------------------------------------------------------


def _hf_config(shape: LMShape):
    from transformers import AutoConfig

    if shape.model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=shape.n_layers, n_embd=shape.d_model,
                                    n_head=shape.n_heads, n_inner=shape.d_mlp,
                                    vocab_size=shape.vocab_size, n_positions=shape.n_ctx)
    return AutoConfig.for_model(
        shape.model_type, num_hidden_layers=shape.n_layers, hidden_size=shape.d_model,
        intermediate_size=shape.d_mlp, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
        vocab_size=shape.vocab_size, max_position_embeddings=shape.n_ctx,
        tie_word_embeddings=shape.tied_embeddings)


def _meta_params(hf_config) -> int:
    """Parameters of transformers' own CausalLM for this config, built on the meta device (no
    memory), tied weights counted once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_shapes_count_the_parameters_transformers_builds(name):
    shape = BUILTIN[name]
    hf = _hf_config(shape)
    assert _meta_params(hf) == shape.params
    again = shape_from_hf_config(hf, name, shape.source)  # the config path reads the same
    assert again == shape


def test_published_parameter_counts():
    """The built-in table against the model cards' totals (independent of the formula)."""
    assert BUILTIN["gpt2"].params == 124_439_808
    assert BUILTIN["meta-llama/Llama-3.2-1B"].params == 1_235_814_400
    assert BUILTIN["google/gemma-2-2b"].params == 2_614_341_888


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_toy_shapes_match_the_built_toy_models(arch, request):
    from transformers import AutoConfig

    toy = request.getfixturevalue(f"toy_{arch}")
    hf = AutoConfig.from_pretrained(toy.path)
    shape = toy_shape(arch)
    assert shape_from_hf_config(hf, shape.name, shape.source) == shape
    assert _meta_params(hf) == shape.params
    local = lm_shape(str(toy.path))  # a local model folder: its config.json
    assert (local.n_layers, local.d_model, local.params) == (shape.n_layers, shape.d_model,
                                                             shape.params)
    assert str(toy.path) in local.source


def test_lm_shape_lookup_and_bad_names():
    assert lm_shape("gpt2") is BUILTIN["gpt2"]
    assert lm_shape("openai-community/gpt2") is BUILTIN["gpt2"]
    assert lm_shape("qwen/qwen3-1.7b") is BUILTIN["Qwen/Qwen3-1.7B"]
    assert lm_shape("toy:llama").name == "toy:llama"
    with pytest.raises(PlanError, match="toy architecture"):
        lm_shape("toy:nope")
    with pytest.raises(CltRayError, match="no-such-org/no-such-model"):  # offline in the tests
        lm_shape("no-such-org/no-such-model")


# --- memory and the shard count ----------------------------------------------------------------


def test_shard_memory_by_hand():
    B, S = 16, 3
    Fs = F // S
    p = L * Fs * D + Fs * D * L * (L + 1) // 2 + 2 * L * Fs + L * D
    m = shard_memory(L, D, F, S, B)
    assert (m.features, m.params) == (Fs, p)
    assert (m.weights, m.gradients, m.adam) == (4 * p, 4 * p, 8 * p)
    assert m.autocast_copies == 0 and m.counters == 8 * L * Fs
    assert m.activations == ACT_COPIES["jumprelu"] * B * L * Fs * 4
    assert m.batch == BATCH_COPIES * B * L * D * 4
    assert m.subtotal == 16 * p + 8 * L * Fs + m.activations + m.batch
    assert m.total == math.ceil(m.subtotal * (1 + SLACK) + RESERVED)
    bf16 = shard_memory(L, D, F, S, B, precision="bfloat16")
    assert bf16.autocast_copies == 2 * (L * Fs * D + Fs * D * L * (L + 1) // 2)  # W_enc, W_dec
    with pytest.raises(PlanError, match="divide"):
        shard_memory(L, D, F, 5, B)


def test_smallest_shard_count_fits_and_divides_the_features():
    assert divisors(F) == [1, 2, 3, 4, 6, 12]
    B = 4096  # activations dominate, so every extra shard saves memory
    need = {s: shard_memory(L, D, F, s, B).total for s in divisors(F)}
    assert all(need[a] > need[b] for a, b in zip(divisors(F), divisors(F)[1:]))
    assert smallest_shards(L, D, F, need[1], B).shards == 1  # fits exactly
    assert smallest_shards(L, D, F, need[1] - 1, B).shards == 2  # does not fit on one
    assert smallest_shards(L, D, F, need[3], B).shards == 3
    # 5 shards would fit between 4 and 6 but do not divide 12: the next count that does
    assert smallest_shards(L, D, F, need[4] - 1, B).shards == 6
    assert smallest_shards(L, D, F, need[12] - 1, B) is None  # nothing fits


def test_make_plan_numbers_agree_with_the_parts():
    plan = make_plan("gpt2", expansion=32, gpu_memory="24GB")
    Fgpt = 32 * 768
    assert plan.clt["n_features"] == Fgpt
    assert plan.clt["params"] == clt_params(12, 768, Fgpt)
    assert plan.shards is not None and Fgpt % plan.shards == 0
    assert plan.per_shard["total"] <= 24e9
    smaller = [s for s in divisors(Fgpt) if s < plan.shards]
    assert all(shard_memory(12, 768, Fgpt, s, 1024).total > 24e9 for s in smaller)
    assert plan.cache_bytes_per_million_tokens == {
        f"int{b}": cache_bytes_per_token(12, 768, b) * 10**6 for b in (8, 4, 2)}
    assert make_plan("gpt2", features=1000).clt["n_features"] == 1000
    assert make_plan("gpt2").clt["n_features"] == 8 * 768  # a run config's default width


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("141 GB") == 141 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80") == 80 * 10**9
    assert parse_size("512MB") == 512 * 10**6
    for bad in ("eighty", "80XB", "0GB", "-1GB"):
        with pytest.raises(PlanError):
            parse_size(bad)


# --- the profile estimate ----------------------------------------------------------------------


def test_profile_estimate(tmp_path):
    prof = tmp_path / "profile.txt"  # as bench/train_step.py --json prints: JSON is the last line
    prof.write_text("device: X\n(a) ...\n" + json.dumps(
        {"achieved_flop_s": {"float32": 2e13, "bfloat16": 8e13}, "sparse_speedup_gpt2": 4.0,
         "device": "Test GPU"}) + "\n")
    plan = make_plan("gpt2", expansion=32, gpu_memory="24GB", profile=prof)
    Fs, B = plan.per_shard["features"], plan.train["batch_size"]
    seconds = step_flops(12, 768, Fs, B) / 2e13
    assert plan.estimate["tokens_per_s"] == pytest.approx(B / seconds)
    assert plan.estimate["tokens_per_s_sparse"] == pytest.approx(4 * B / seconds)
    bf16 = make_plan("gpt2", expansion=32, gpu_memory="24GB", precision="bfloat16", profile=prof)
    assert bf16.estimate["flop_s"] == 8e13
    ratio = tmp_path / "ratio.json"
    ratio.write_text(json.dumps({"matmul_flop_s": 1e14, "flop_ratio_gpt2_dense": 0.5}))
    assert load_profile(ratio).flop_s == {"*": 5e13}
    ratio.write_text(json.dumps({"sparse_speedup_gpt2": 4.0}))
    with pytest.raises(PlanError, match="achieved_flop_s"):
        load_profile(ratio)


# --- the command line and the README table -----------------------------------------------------


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from clt_ray import cli

    monkeypatch.setattr("sys.argv", ["clt-ray", "plan", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_table_and_json(monkeypatch, capsys):
    code, text, _ = _run(monkeypatch, capsys, "gpt2", "--expansion", "32", "--gpu-memory", "80GB")
    plan = make_plan("gpt2", expansion=32, gpu_memory="80GB")
    assert code == 0
    assert "24,576 features a layer" in text and f"shards       {plan.shards} " in text
    assert "int8" in text and "int2" in text and "producer" in text
    code, out, _ = _run(monkeypatch, capsys, "gpt2", "--expansion", "32", "--json")
    assert code == 0 and json.loads(out) == json.loads(plan.to_json())


@pytest.mark.parametrize("args, needle", [
    (["no-such-org/no-such-model"], "no-such-org/no-such-model"),
    (["gpt2", "--expansion", "0"], "width must be positive"),
    (["gpt2", "--expansion", "8", "--features", "100"], "not both"),
    (["gpt2", "--gpu-memory", "eighty"], "eighty"),
    (["toy:nope"], "toy architecture"),
])
def test_cli_bad_input_is_one_line(monkeypatch, capsys, args, needle):
    code, out, err = _run(monkeypatch, capsys, *args)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("Error:") and needle in err
    assert "Traceback" not in err


def test_readme_table():
    table = readme_table().splitlines()
    assert len(table) == 2 + len(BUILTIN)
    for name, row in zip(BUILTIN, table[2:]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"`{name}`"
        shards = [int(c.split()[0]) for c in cells[6:9]]
        n_features = int(cells[3].replace(",", ""))
        assert all(n_features % s == 0 for s in shards)
        assert shards == sorted(shards, reverse=True)  # more memory, never more shards
