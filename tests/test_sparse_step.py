"""The sparse training step (clt_ray.nn.step, SparseDecode) is the dense step to round-off: after
several Adam steps the weights, Adam moments and JumpReLU thresholds agree, in one process and
on 2 feature shards; `auto` decodes sparsely only below the device's measured crossover."""

from __future__ import annotations

import pytest
import torch
from test_step import LOSS, setup
from test_training import small_config

from clt_ray.config import LRSchedule, OptimConfig
from clt_ray.nn import step as step_module
from clt_ray.nn.step import (
    LOCAL,
    SPARSE_MAX_DENSITY,
    Collectives,
    make_optimizer,
    train_step,
    use_sparse_decoder,
)

# pytest resets warning filters per test; clt.py ignores this one-time notice the same way
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
OPTIM = OptimConfig(lr=LRSchedule(lr=1e-2, warmup_frac=0.0, decay="constant"), max_grad_norm=5.0)
STEPS = 4


def run_steps(model, x, y, decoders, collectives=LOCAL):
    """Adam steps on (x·(1 + t/10), y), step t decoding with decoders[t]; the optimizer after."""
    opt = make_optimizer(model, OPTIM)
    results = [train_step(model, opt, x * (1 + 0.1 * t), y, step=t, total_steps=len(decoders),
                          loss_cfg=LOSS, optim_cfg=OPTIM, collectives=collectives,
                          decoder=dec)
               for t, dec in enumerate(decoders)]
    return results, opt


def state(model, opt):
    """name → (parameter, exp_avg, exp_avg_sq), detached copies."""
    return {n: tuple(t.detach().clone() for t in (p, opt.state[p]["exp_avg"],
                                                   opt.state[p]["exp_avg_sq"]))
            for n, p in model.named_parameters()}


def assert_close_state(got, want, rel=2e-5):
    """Every tensor within `rel` of the reference tensor's largest entry (fp32 round-off, also
    through Adam's division by √v)."""
    assert got.keys() == want.keys()
    for name in want:
        for what, g, w in zip(("param", "exp_avg", "exp_avg_sq"), got[name], want[name],
                              strict=True):
            err = (g - w).abs().max().item()
            assert err <= rel * w.abs().max().item(), (name, what, err, w.abs().max().item())


def make(activation="jumprelu", k=None, ranges=((0, 6), (6, 12))):
    """test_step's fp32 CLT (features fire on ~30% of tokens), with features 2 and 9 of every
    layer silenced (they never fire, nor reach the window), and its shards."""
    whole, _, x, y = setup(activation, k, dtype=torch.float32)
    with torch.no_grad():
        whole.b_enc[:, [2, 9]] = -100.0
    return whole, [whole.shard(a, b) for a, b in ranges], x, y


def check_setup(model, x):
    """The test is only meaningful if features fire and don't, and JumpReLU's window holds
    inactive pre-activations (whose ∂L/∂a reaches θ)."""
    pre, acts = model.encode(model.normalize(x)[0])
    active = acts != 0
    window_only = model.grad_support(pre, acts) & ~active
    assert 0 < active.float().mean() < 0.5
    assert window_only.any()
    assert (~active.any(0)).any() and active.any(0).any()  # some features never fire


@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("relu", None), ("batchtopk", 3)])
def test_sparse_steps_equal_dense_steps_in_fp32(activation, k):
    whole, _, x, y = make(activation, k)
    if activation == "jumprelu":
        check_setup(whole, x)
    init = {n: p.detach().clone() for n, p in whole.named_parameters()}
    ref, opt = run_steps(whole, x, y, ["dense"] * STEPS)
    want = state(whole, opt)
    assert (whole.log_threshold - init["log_threshold"]).abs().max() > 1e-3 if \
        activation == "jumprelu" else True  # θ really trained

    with torch.no_grad():
        for n, p in whole.named_parameters():
            p.copy_(init[n])
    # dense and sparse interleaved: the sparse step also writes into gradients the dense made
    got, opt = run_steps(whole, x, y, ["sparse", "sparse", "dense", "sparse"])
    assert [r.loss for r in got] == pytest.approx([r.loss for r in ref], rel=1e-5)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.l0_per_layer, b.l0_per_layer)
        assert torch.equal(a.fired, b.fired)
    assert_close_state(state(whole, opt), want)


def test_sparse_steps_on_two_shards_equal_dense_steps_in_one_process():
    from local_group import LocalGroup

    whole, parts, x, y = make(ranges=((0, 5), (5, 12)))
    check_setup(whole, x)
    _, opt = run_steps(whole, x, y, ["dense"] * STEPS)
    want = state(whole, opt)

    group = LocalGroup(len(parts))

    def shard(rank):
        c = Collectives(reduce_sum=group.reduce_sum(rank), gather=group.gather(rank))
        return run_steps(parts[rank], x, y, ["sparse"] * STEPS, collectives=c)[1]

    opts = group.run(shard)
    shards = [state(p, o) for p, o in zip(parts, opts, strict=True)]
    joined = {}
    for name in want:
        if name == "b_dec":
            assert all(torch.equal(s["b_dec"][0], shards[0]["b_dec"][0]) for s in shards)
            joined[name] = shards[0][name]
        else:
            dim = 0 if name.startswith("W_dec") else 1
            joined[name] = tuple(torch.cat([s[name][i] for s in shards], dim) for i in range(3))
    assert_close_state(joined, want)


def test_sparse_step_writes_w_dec_gradients_in_place_and_exactly_each_step():
    """The sparse step reuses last step's W_dec gradient tensors; a second step must overwrite
    them (not accumulate) and give the same gradients as a fresh dense step."""
    whole, _, x, y = setup(dtype=torch.float64)
    step_module.compute_grads(whole, x, y, LOSS, lam=0.5, decoder="sparse")
    before = [w.grad for w in whole.W_dec]
    step_module.compute_grads(whole, x, y, LOSS, lam=0.5, decoder="sparse")
    assert all(w.grad is b for w, b in zip(whole.W_dec, before, strict=True))
    sparse = {n: p.grad.clone() for n, p in whole.named_parameters()}
    step_module.compute_grads(whole, x, y, LOSS, lam=0.5, decoder="dense")
    for n, p in whole.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, msg=n)


# --- the automatic choice ----------------------------------------------------------------------


def test_auto_decodes_sparsely_only_below_the_devices_crossover():
    cut = SPARSE_MAX_DENSITY["cpu"]
    assert 0 < cut < 1
    assert use_sparse_decoder("auto", cut / 2, "cpu")
    assert not use_sparse_decoder("auto", min(1.0, cut * 2), "cpu")  # sparse is slower there
    assert not use_sparse_decoder("auto", 0.0, "cuda")  # not measured: dense
    assert not use_sparse_decoder("auto", 0.0, "mps")
    assert use_sparse_decoder("sparse", 1.0, "cuda") and not use_sparse_decoder("dense", 0, "cpu")
    with pytest.raises(ValueError, match="decoder must be"):
        use_sparse_decoder("fast", 0.0, "cpu")  # type: ignore[arg-type]


def paths_taken(monkeypatch, model, x, y, decoder):
    """Which decoder compute_grads ran, and the support density `auto` saw."""
    seen = {}
    real = step_module.use_sparse_decoder

    def spy(dec, density, device):
        seen["density"] = density
        seen["sparse"] = real(dec, density, device)
        return seen["sparse"]

    monkeypatch.setattr(step_module, "use_sparse_decoder", spy)
    step_module.compute_grads(model, x, y, LOSS, lam=0.5, decoder=decoder)
    return seen


def test_auto_falls_back_to_dense_when_jumprelus_window_is_wide(monkeypatch):
    """The support includes JumpReLU's window: a wide one (here: most pre-activations within ε/2
    of θ) makes the sparse step as costly as dense at any L0, so auto decodes densely."""
    whole, _, x, y = setup(dtype=torch.float32)
    wide = paths_taken(monkeypatch, whole, x, y, "auto")
    assert wide["density"] > SPARSE_MAX_DENSITY["cpu"] and not wide["sparse"]
    whole.cfg = whole.cfg.model_copy(update={"bandwidth": 1e-6})
    with torch.no_grad():
        whole.b_enc.sub_(3.0)  # few features fire: L0/F well under the crossover
    narrow = paths_taken(monkeypatch, whole, x, y, "auto")
    assert narrow["density"] <= SPARSE_MAX_DENSITY["cpu"] and narrow["sparse"]


def test_trainer_passes_the_configured_decoder_to_the_step(monkeypatch):
    from clt_ray.train import loop

    seen = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (seen.append(k["decoder"]),
                                                             real(*a, **k))[1])
    cfg = small_config(train={"decoder": "sparse", "batch_size": 64})
    assert cfg.train.decoder == "sparse" and small_config().train.decoder == "auto"
    whole, _, x, y = setup(dtype=torch.float32)
    trainer = loop.Trainer(whole, loss=LOSS, optim=OPTIM, train=cfg.train, total_steps=2)
    trainer.train_step(x, y)
    assert seen == ["sparse"]
