"""The split training step is exact: N feature shards summed through the callbacks give the
whole CLT's loss, gradients, clipping and Adam updates (docs/design.md §3)."""

from __future__ import annotations

import pytest
import torch
from local_group import LocalGroup

from clt_ray.config import CLTConfig, LossConfig, LRSchedule, OptimConfig, SparsitySchedule
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.nn.losses import mse_loss, preact_loss, tanh_sparsity
from clt_ray.nn.step import Collectives, compute_grads, make_optimizer, train_step

L, D, F, B = 3, 8, 12, 16
LOSS = LossConfig(sparsity=SparsitySchedule(final=0.5, ramp_frac=0.5), tanh_c=2.0, preact_coef=0.1)


def setup(activation="jumprelu", k=None, dtype=torch.float64, ranges=((0, 6), (6, F))):
    torch.manual_seed(0)
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, activation=activation, k=k,
                    bandwidth=0.5, init_threshold=0.05)
    x = torch.randn(B, L, D, dtype=dtype) * 3
    y = torch.tanh(x @ torch.randn(D, D, dtype=dtype)) * 2
    whole = CrossLayerTranscoder(cfg, dtype=dtype)
    whole.set_norm_scales(x, y)
    whole.init_b_enc_from_data(whole.normalize(x)[0], 0.3)
    with torch.no_grad():
        whole.b_dec.normal_(0, 0.1)
        for w in whole.W_dec:
            w.mul_(30)  # decoder norms O(1), so the sparsity terms matter
    return whole, [whole.shard(a, b) for a, b in ranges], x, y


def grads(m: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in m.named_parameters()}


def assert_shards_match_whole(whole, parts, what, rel):
    """Shard tensors (grads or params) concatenated along features equal the whole's, to `rel`
    times the tensor's largest entry (round-off scales with it); b_dec equal on every shard."""
    get = (lambda m: grads(m)) if what == "grad" else (lambda m: dict(m.named_parameters()))
    ps = [get(p) for p in parts]
    for name, ref in get(whole).items():
        if name == "b_dec":
            joined = [p[name] for p in ps]
            assert all(torch.equal(j, joined[0]) for j in joined)  # bitwise replicated
        else:
            joined = [torch.cat([p[name] for p in ps], 0 if name.startswith("W_dec") else 1)]
        for j in joined:
            err = (j - ref).abs().max().item()
            assert err <= rel * ref.abs().max().item(), (name, err, ref.abs().max().item())


def test_step_gradients_equal_plain_autograd_of_the_whole_loss():
    whole, _, x, y = setup()
    res = compute_grads(whole, x, y, LOSS, lam=0.5)
    ref = CrossLayerTranscoder(whole.cfg, dtype=torch.float64)
    ref.load_state_dict(whole.state_dict())
    xn, yn = ref.normalize(x, y)
    out = ref(xn)
    loss = (mse_loss(out.recon, yn) + 0.5 * tanh_sparsity(out.acts, out.dec_norms, 2.0)
            + 0.1 * preact_loss(out.pre, out.dec_norms, ref.threshold))
    loss.backward()
    assert res.loss == pytest.approx(loss.item(), rel=1e-12)
    for name, g in grads(whole).items():
        torch.testing.assert_close(g, ref.get_parameter(name).grad, msg=name)
    assert whole.log_threshold.grad.abs().sum() > 0  # the STE reached θ
    total = torch.cat([g.flatten() for g in grads(whole).values()]).norm().item()
    assert res.grad_norm == pytest.approx(total, rel=1e-12)


def run_split(parts, fn):
    group = LocalGroup(len(parts))
    return group.run(lambda r: fn(parts[r], group.reduce_sum(r), group.gather(r)))


@pytest.mark.parametrize("clip", [None, 0.05])
def test_two_shards_fp32_give_whole_loss_and_gradients(clip):
    whole, parts, x, y = setup(dtype=torch.float32)
    res = compute_grads(whole, x, y, LOSS, lam=0.5, max_grad_norm=clip)
    split = run_split(parts, lambda m, red, gat: compute_grads(
        m, x, y, LOSS, lam=0.5, reduce_sum=red, gather=gat, max_grad_norm=clip))
    assert clip is None or res.grad_norm > clip  # clipping really happens
    for r in split:
        for f in ("loss", "mse", "sparsity", "preact", "grad_norm"):
            assert getattr(r, f) == pytest.approx(getattr(res, f), rel=1e-6, abs=1e-6), f
        torch.testing.assert_close(r.mse_per_layer, res.mse_per_layer, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.l0_per_layer, res.l0_per_layer)
    assert torch.equal(torch.cat([r.fired for r in split], 1), res.fired)
    assert_shards_match_whole(whole, parts, "grad", rel=1e-6)
    if clip is not None:  # the clipped global norm, b_dec counted once
        local = [torch.cat([g.flatten() for n, g in grads(p).items() if n != "b_dec"])
                 for p in parts]
        norm = torch.cat(local + [parts[0].b_dec.grad.flatten()]).norm().item()
        assert norm == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize("activation,k,ranges", [
    ("jumprelu", None, ((0, 5), (5, 7), (7, F))),
    ("relu", None, ((0, 6), (6, F))),
    ("topk", 3, ((0, 2), (2, 7), (7, F))),
    ("batchtopk", 3, ((0, 6), (6, F))),
])
def test_split_adam_steps_reproduce_whole_weights(activation, k, ranges):
    whole, parts, x, y = setup(activation, k, ranges=ranges)
    optim = OptimConfig(lr=LRSchedule(lr=1e-2, warmup_frac=1.0, decay="constant"),
                        max_grad_norm=0.5)
    total = 4

    def run(m, red, gat):
        opt = make_optimizer(m, optim)
        return [train_step(m, opt, x * (1 + 0.1 * t), y, step=t, total_steps=total,
                           loss_cfg=LOSS, optim_cfg=optim,
                           collectives=Collectives(reduce_sum=red, gather=gat))
                for t in range(total)]

    ref = run(whole, lambda t: t, None)
    split = run_split(parts, run)
    assert [r.lr for r in ref] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    for rs in split:
        assert [r.loss for r in rs] == pytest.approx([r.loss for r in ref], rel=1e-10)
    assert_shards_match_whole(whole, parts, "param", rel=1e-10)
    assert (whole.W_enc - setup(activation, k)[0].W_enc).abs().max() > 1e-4  # it did train


def test_step_rejects_mismatched_batches():
    whole, _, x, y = setup()
    with pytest.raises(ValueError, match="target shape"):
        compute_grads(whole, x, y[:, :, :-1], LOSS, lam=0.1)
    with pytest.raises(ValueError, match=r"shape \[batch, 3, 8\]"):
        compute_grads(whole, x[:, :2], y, LOSS, lam=0.1)


def test_local_group_propagates_errors_instead_of_hanging():
    group = LocalGroup(2, timeout=10)

    def fn(r):
        if r == 1:
            raise RuntimeError("shard 1 failed")
        return group.reduce_sum(r)(torch.ones(1))

    with pytest.raises(RuntimeError, match="shard 1 failed"):
        group.run(fn)
