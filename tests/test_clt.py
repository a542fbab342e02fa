"""CrossLayerTranscoder against plain loops, the JumpReLU estimator, init, normalisation, export."""

from __future__ import annotations

import math

import pytest
import torch
from local_group import LocalGroup
from pydantic import ValidationError

from clt_ray.config import CLTConfig
from clt_ray.nn.clt import CrossLayerTranscoder, estimate_norm_scale, jumprelu

L, D, F = 3, 8, 12
DT = torch.float64


def make(activation: str = "jumprelu", k: int | None = None, n_features: int = F, **kw):
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=n_features, activation=activation, k=k,
                    **kw)
    torch.manual_seed(0)
    m = CrossLayerTranscoder(cfg, dtype=DT)
    with torch.no_grad():  # every parameter non-trivial, so a wrong index shows
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
        for w in m.W_dec:
            w.normal_()
        if activation == "jumprelu":
            m.log_threshold.uniform_(-3, -0.5)
    return m


def reference(m: CrossLayerTranscoder, x: torch.Tensor):
    """Per source layer, per target layer, per token — the §2 formulas literally."""
    B = x.shape[0]
    pre = torch.stack([x[:, l] @ m.W_enc[l].T + m.b_enc[l] for l in range(L)], dim=1)
    act = m.cfg.activation
    if act == "jumprelu":
        acts = pre * (pre > m.log_threshold.exp())
    elif act == "relu":
        acts = pre.clamp_min(0)
    else:
        acts = torch.zeros_like(pre)
        for l in range(L):
            if act == "topk":
                for b in range(B):
                    idx = pre[b, l].argsort(descending=True)[: m.cfg.k]
                    acts[b, l, idx] = pre[b, l, idx].clamp_min(0)
            else:
                flat = pre[:, l].flatten()
                idx = flat.argsort(descending=True)[: m.cfg.k * B]
                sel = torch.zeros_like(flat)
                sel[idx] = flat[idx].clamp_min(0)
                acts[:, l] = sel.view(B, -1)
    y = torch.zeros(B, L, D, dtype=x.dtype)
    for k in range(L):
        y[:, k] = m.b_dec[k]
        for l in range(k + 1):
            y[:, k] += acts[:, l] @ m.W_dec[l][:, k - l, :]
    return pre, acts, y


@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("relu", None), ("topk", 3),
                                          ("batchtopk", 3)])
def test_forward_matches_loop_reference(activation, k):
    m = make(activation, k)
    x = torch.randn(10, L, D, dtype=DT)
    out = m(x)
    pre, acts, y = reference(m, x)
    torch.testing.assert_close(out.pre, pre)
    torch.testing.assert_close(out.acts, acts)
    torch.testing.assert_close(out.recon, y)
    assert (acts > 0).any() and (acts == 0).any()
    norms = torch.stack([torch.stack([m.W_dec[l][i].norm() for i in range(F)]) for l in range(L)])
    torch.testing.assert_close(out.dec_norms, norms)
    if activation == "topk":
        assert ((out.acts > 0).sum(-1) <= k).all()


def test_sparse_decode_matches_dense():
    m = make("relu")
    x = torch.randn(10, L, D, dtype=DT)
    acts = m.encode(x)[1].detach()
    dense = m.decode(acts)
    dense.square().sum().backward()
    g_dense = [w.grad.clone() for w in m.W_dec]
    m.zero_grad()
    sparse = m.decode(acts, sparse=True)
    sparse.square().sum().backward()
    torch.testing.assert_close(sparse, dense)
    for w, g in zip(m.W_dec, g_dense):
        torch.testing.assert_close(w.grad, g)


def test_shards_partials_sum_to_whole_and_init_is_shard_invariant():
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, seed=3)
    whole = CrossLayerTranscoder(cfg, dtype=DT)
    parts = [CrossLayerTranscoder(cfg, a, b, dtype=DT) for a, b in [(0, 5), (5, 6), (6, 12)]]
    torch.testing.assert_close(torch.cat([p.W_enc for p in parts], 1), whole.W_enc, rtol=0, atol=0)
    for l in range(L):
        assert torch.equal(torch.cat([p.W_dec[l] for p in parts]), whole.W_dec[l])
    x = torch.randn(6, L, D, dtype=DT)
    with torch.no_grad():
        whole.b_enc.fill_(0.2)
        for p in parts:
            p.b_enc.fill_(0.2)
    total = sum(p.decode(p.encode(x)[1], bias=False) for p in parts)
    torch.testing.assert_close(total, whole.decode(whole.encode(x)[1], bias=False))
    resliced = whole.shard(5, 12)
    assert torch.equal(resliced.W_dec[0], torch.cat([parts[1].W_dec[0], parts[2].W_dec[0]]))
    assert torch.equal(resliced.b_dec, whole.b_dec)


# --- JumpReLU straight-through estimator --------------------------------------------------------


def test_jumprelu_ste_gradients_match_formula_through_log_theta():
    torch.manual_seed(1)
    eps = 0.3
    h = torch.randn(50, 2, 4, dtype=DT, requires_grad=True)
    log_theta = torch.log(torch.rand(2, 4, dtype=DT) * 0.5 + 0.1).requires_grad_()
    up = torch.randn(50, 2, 4, dtype=DT)
    a = jumprelu(h, log_theta.exp(), eps)
    (a * up).sum().backward()
    theta = log_theta.detach().exp()
    fires = h.detach() > theta
    torch.testing.assert_close(a.detach(), h.detach() * fires)
    torch.testing.assert_close(h.grad, up * fires)
    in_window = ((h.detach() - theta).abs() < eps / 2).to(DT)
    # ∂a/∂log θ = ∂a/∂θ · θ = −(θ²/ε)·K((h − θ)/ε)
    expected = (-(theta**2) / eps * in_window * up).sum(0)
    assert in_window.sum() > 10
    torch.testing.assert_close(log_theta.grad, expected)


def test_jumprelu_ste_matches_finite_differences_of_smoothed_function():
    """Rajamanoharan et al.: the θ-estimator is the derivative of the kernel-smoothed expected
    activation. With h spread over a known density p (a fine grid with weights p·δ), the summed
    STE gradient ≈ −θ·p(θ) = d/dθ E[h·1[h>θ]], which finite differences of E measure."""
    eps, theta0, delta = 0.05, 0.7, 1e-4
    h = torch.arange(-5, 5, delta, dtype=DT)
    w = torch.exp(-0.5 * (h - 0.3) ** 2) / math.sqrt(2 * math.pi) * delta  # N(0.3, 1)
    log_theta = torch.tensor(math.log(theta0), dtype=DT, requires_grad=True)
    (jumprelu(h, log_theta.exp(), eps) * w).sum().backward()
    ste_dtheta = log_theta.grad.item() / theta0  # undo the log θ chain factor

    def expected_act(t: float) -> float:
        return (h * (h > t) * w).sum().item()

    step = 0.01
    fd = (expected_act(theta0 + step) - expected_act(theta0 - step)) / (2 * step)
    exact = -theta0 * math.exp(-0.5 * (theta0 - 0.3) ** 2) / math.sqrt(2 * math.pi)
    assert fd == pytest.approx(exact, rel=2e-3)
    assert ste_dtheta == pytest.approx(fd, rel=5e-3)


def test_jumprelu_ste_per_token_matches_smoothed_heaviside():
    """Per token: a_ε(h, θ) = h·S((h−θ)/ε), S the rectangle kernel's CDF, has ∂/∂θ = −(h/ε)·K;
    the STE puts θ for h, equal up to |h − θ|/θ ≤ ε/(2θ) inside the window."""
    eps, theta = 0.02, 0.5
    h = torch.linspace(theta - 0.009, theta + 0.009, 7, dtype=DT)
    t = torch.tensor(theta, dtype=DT, requires_grad=True)
    jumprelu(h, t.expand_as(h), eps).sum().backward()

    def smoothed(tt: float) -> torch.Tensor:
        return h * ((h - tt) / eps + 0.5).clamp(0, 1)

    step = 1e-5
    fd = ((smoothed(theta + step) - smoothed(theta - step)) / (2 * step)).sum().item()
    assert t.grad.item() == pytest.approx(fd, rel=eps / (2 * theta))


# --- data-driven setup ---------------------------------------------------------------------------


def test_norm_scales_and_folded_weights_reproduce_raw_space():
    m = make("jumprelu")
    x = torch.randn(64, L, D, dtype=DT) * torch.tensor([3.0, 0.2, 10.0], dtype=DT)[:, None]
    y = torch.randn(64, L, D, dtype=DT) * 5
    m.set_norm_scales(x, y)
    xn, yn = m.normalize(x, y)
    torch.testing.assert_close(xn.norm(dim=-1).mean(0), torch.full((L,), math.sqrt(D), dtype=DT))
    torch.testing.assert_close(yn.norm(dim=-1).mean(0), torch.full((L,), math.sqrt(D), dtype=DT))
    y_raw = m(xn).recon / m.s_out[:, None]
    # the same §2 model on the folded raw-space weights
    fw = m.folded_weights()
    pre = torch.stack([x[:, l] @ fw[f"W_enc_{l}"].T + fw[f"b_enc_{l}"] for l in range(L)], 1)
    acts = pre * (pre > torch.stack([fw[f"threshold_{l}"] for l in range(L)]))
    ref = torch.stack([fw[f"b_dec_{k}"] + sum(acts[:, l] @ fw[f"W_dec_{l}"][:, k - l]
                                             for l in range(k + 1)) for k in range(L)], 1)
    torch.testing.assert_close(y_raw, ref)
    with pytest.raises(ValueError, match="all zero"):
        estimate_norm_scale(torch.zeros(4, L, D))


def test_folded_weights_load_into_circuit_tracer_and_match():
    ct = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
    m = make("jumprelu")
    x = torch.randn(16, L, D, dtype=DT) * 4
    m.set_norm_scales(x, torch.randn(16, L, D, dtype=DT) * 2)
    with torch.no_grad():
        m.log_threshold.fill_(math.log(1e-3))  # every position has active features (ct's n_pos)
    fw = {k: v.float() for k, v in m.folded_weights().items()}
    clt = ct.CrossLayerTranscoder(L, F, D, activation_function="jump_relu", lazy_decoder=False,
                                  device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        for l in range(L):
            clt.W_enc[l] = fw[f"W_enc_{l}"]
            clt.b_enc[l] = fw[f"b_enc_{l}"]
            clt.b_dec[l] = fw[f"b_dec_{l}"]
            clt.W_dec[l].copy_(fw[f"W_dec_{l}"])
            clt.activation_function.threshold[l, 0] = fw[f"threshold_{l}"]
    theirs = clt(x.float().transpose(0, 1)).transpose(0, 1)
    ours = m(m.normalize(x)[0]).recon / m.s_out[:, None]
    torch.testing.assert_close(theirs, ours.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_init_b_enc_hits_target_rate_vectorised_and_chunked(activation):
    m = make(activation, n_features=40)
    torch.manual_seed(2)
    x, held_out = torch.randn(2000, L, D, dtype=DT), torch.randn(2000, L, D, dtype=DT)
    m.init_b_enc_from_data(x, 0.05)
    rate = (m.encode(x)[1] > 0).double().mean(0)
    torch.testing.assert_close(rate, torch.full_like(rate, 0.05))  # exactly 100 of 2000 tokens
    held = (m.encode(held_out)[1] > 0).double().mean()
    assert held.item() == pytest.approx(0.05, abs=0.005)
    b = m.b_enc.detach().clone()
    m.init_b_enc_from_data(x, 0.05, max_elements=2000 * 3)  # 3 features per chunk
    torch.testing.assert_close(m.b_enc.detach(), b)
    with pytest.raises(ValueError, match="target_rate"):
        m.init_b_enc_from_data(x, 1.5)


def test_batchtopk_to_jumprelu_keeps_l0_per_layer():
    torch.manual_seed(4)
    k = 4
    m = make("batchtopk", k=k, n_features=64)
    m.init_b_enc_from_data(torch.randn(1000, L, D, dtype=DT), 0.1)
    calib, held_out = torch.randn(3000, L, D, dtype=DT), torch.randn(3000, L, D, dtype=DT)
    l0_before = (m.encode(held_out)[1] > 0).double().sum(-1).mean(0)
    torch.testing.assert_close(l0_before, torch.full((L,), float(k), dtype=DT))
    m.to_jumprelu(calib, max_elements=700 * L * 64)
    assert m.cfg.activation == "jumprelu" and m.cfg.k is None
    assert (m.encode(calib)[1] > 0).sum((0, 2)).tolist() == [k * 3000] * L  # exact on calibration
    l0_after = (m.encode(held_out)[1] > 0).double().sum(-1).mean(0)
    assert ((l0_after - k).abs() / k < 0.1).all(), l0_after
    with pytest.raises(ValueError, match="topk/batchtopk"):
        m.to_jumprelu(calib)


def test_to_jumprelu_on_shards_gives_the_whole_thresholds():
    m = make("batchtopk", k=2)
    x = torch.randn(300, L, D, dtype=DT)
    parts = [m.shard(0, 5), m.shard(5, F)]
    m.to_jumprelu(x)
    group = LocalGroup(2)
    group.run(lambda r: parts[r].to_jumprelu(x, gather=group.gather(r)))
    for p in parts:
        torch.testing.assert_close(p.log_threshold, m.log_threshold[:, : p.n_local])
    with pytest.raises(ValueError, match="gather"):
        make("batchtopk", k=2).shard(0, 5).to_jumprelu(x)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"n_features": 0}, "n_features"),
    ({"n_features": -3}, "n_features"),
    ({"d_model": 0}, "d_model"),
    ({"activation": "gelu"}, "activation"),
    ({"activation": "topk"}, "needs k"),
    ({"activation": "batchtopk", "k": F + 1}, "exceeds n_features"),
    ({"activation": "relu", "k": 2}, "only used by topk"),
    ({"bandwidth": 0.0}, "bandwidth"),
    ({"n_layers": 2, "d_model": 4, "n_features": 4, "colour": "red"}, "colour"),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
    base = {"n_layers": L, "d_model": D, "n_features": F}
    with pytest.raises(ValidationError, match=match):
        CLTConfig(**{**base, **kwargs})


def test_bad_inputs_and_ranges_raise_clear_errors():
    m = make("relu")
    with pytest.raises(ValueError, match=r"shape \[batch, 3, 8\].*got \[4, 3, 7\]"):
        m.encode(torch.randn(4, L, D - 1, dtype=DT))
    with pytest.raises(ValueError, match=r"got \[4, 2, 8\]"):
        m(torch.randn(4, L - 1, D, dtype=DT))
    with pytest.raises(ValueError, match=r"got \[3, 8\]"):
        m.normalize(torch.randn(L, D, dtype=DT))
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F)
    for start, stop in [(0, 0), (5, 3), (0, F + 1), (-1, 4)]:
        with pytest.raises(ValueError, match="feature range"):
            CrossLayerTranscoder(cfg, start, stop)
    shard = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, n_features=F,
                                           activation="topk", k=2), 0, 6)
    with pytest.raises(ValueError, match="gather"):
        shard.encode(torch.randn(2, L, D))
