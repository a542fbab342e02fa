"""The CLT's fast paths give the plain formulas' results: the sparse decoders (embedding_bag over
active rows; the training step's SparseDecode over CSR matrices), the encoder and decoder-norm
autograd functions (their one-pass backwards), the step's fused activation + penalties, also
under autocast."""

from __future__ import annotations

import pytest
import torch

from clt_ray.config import CLTConfig
from clt_ray.nn.clt import CrossLayerTranscoder, EncoderFn, SparseDecode, jumprelu, row_norms
from clt_ray.nn.losses import activation_with_losses, preact_loss, tanh_sparsity

# pytest resets warning filters per test; clt.py ignores this one-time notice the same way
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
L, D, F, B = 4, 8, 64, 33


def make(dtype=torch.float64) -> CrossLayerTranscoder:
    cfg = CLTConfig(n_layers=L, d_model=D, n_features=F, bandwidth=0.5)
    m = CrossLayerTranscoder(cfg, dtype=dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_(-1.0, 0.5)  # sparse: a few % of features active
        for w in m.W_dec:
            w.normal_()
    return m


def grads(m: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_decode_equals_dense_values_and_gradients(dtype):
    m = make(dtype)
    x = torch.randn(B, L, D, dtype=dtype)
    target = torch.randn(B, L, D, dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    out = {}
    for sparse in (False, True):
        m.zero_grad()
        acts = m.encode(x)[1].detach().requires_grad_(True)
        y = m.decode(acts, sparse=sparse)
        (y - target).square().sum().backward()
        out[sparse] = (y.detach(), grads(m), acts.grad)
    density = (acts != 0).float().mean()
    assert 0 < density < 0.2
    torch.testing.assert_close(out[True][0], out[False][0], **tol)
    assert out[True][1].keys() == out[False][1].keys() >= {"b_dec", "W_dec.0", "W_dec.3"}
    for name in out[False][1]:
        torch.testing.assert_close(out[True][1][name], out[False][1][name], **tol)
    active = acts != 0  # the acts gradient exists on the support only
    torch.testing.assert_close(out[True][2][active], out[False][2][active], **tol)
    assert (out[True][2][~active] == 0).all()


def test_support_makes_the_jumprelu_threshold_gradient_exact():
    m = make()
    x = torch.randn(B, L, D, dtype=torch.float64)
    target = torch.randn(B, L, D, dtype=torch.float64)

    def theta_grad(sparse: bool, support: bool) -> torch.Tensor:
        m.zero_grad()
        pre, acts = m.encode(x)
        window = (pre.detach() - m.threshold.detach()).abs() < m.cfg.bandwidth / 2
        sup = (acts.detach() != 0) | window if support else None
        y = m.decode(acts, sparse=sparse, support=sup)
        (y - target).square().sum().backward()
        return m.log_threshold.grad.clone()

    dense = theta_grad(False, False)
    assert dense.abs().sum() > 0
    torch.testing.assert_close(theta_grad(True, True), dense)
    assert not torch.allclose(theta_grad(True, False), dense)  # without it: only h > θ counts


def test_sparse_decode_with_no_active_features():
    m = make()
    acts = torch.zeros(5, L, F, dtype=torch.float64)
    torch.testing.assert_close(m.decode(acts, sparse=True), m.decode(acts))


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_grad_support_is_the_active_entries_and_jumprelus_window(activation):
    m = make()
    m.cfg = m.cfg.model_copy(update={"activation": activation})
    pre, acts = m.encode(torch.randn(B, L, D, dtype=torch.float64))
    want = acts != 0
    if activation == "jumprelu":  # where JumpReLUFn passes ∂L/∂a on to h or θ
        want |= (pre - m.threshold).abs() < m.cfg.bandwidth / 2
    assert want.any() and not want.all()
    assert torch.equal(m.grad_support(pre, acts), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_sparse_decode_equals_dense_products(dtype):
    """SparseDecode: ŷ, ∂L/∂a on the support (0 elsewhere) and the W_dec gradient accumulated
    into given buffers equal the dense decoder's; a layer with no active feature is fine."""
    m = make(dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    pre, acts = m.encode(torch.randn(B, L, D, dtype=dtype))
    acts = acts.detach()
    acts[:, 2] = 0  # no active feature in source layer 2
    support = m.grad_support(pre, acts)
    target = torch.randn(B, L, D, dtype=dtype)
    m.zero_grad()
    a_dense = acts.clone().requires_grad_(True)
    y_dense = m.decode(a_dense, bias=False)
    (y_dense - target).square().sum().backward()
    a_sparse = acts.clone().requires_grad_(True)
    dec = SparseDecode(m, a_sparse, support)
    y = dec.decode(a_sparse)
    g = torch.autograd.grad((y - target).square().sum(), y, retain_graph=True)[0]
    y.backward(g)
    torch.testing.assert_close(y, y_dense, **tol)
    torch.testing.assert_close(a_sparse.grad[support], a_dense.grad[support], **tol)
    assert (a_sparse.grad[~support] == 0).all()
    out = [torch.full_like(w, 0.5) for w in m.W_dec]  # the norm term already there: added to
    dec.weight_grads(g, out)
    for w, got in zip(m.W_dec, out, strict=True):
        torch.testing.assert_close(got, w.grad + 0.5, **tol)
    assert (out[2] == 0.5).all()  # source layer 2 decoded nothing


def test_training_sparse_decode_under_autocast_runs_in_the_weights_dtype():
    m = make(torch.float32)
    pre, acts = m.encode(torch.randn(B, L, D))
    ref = m.decode(acts.detach(), bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = acts.detach().bfloat16().requires_grad_(True)
        y = SparseDecode(m, a, m.grad_support(pre, acts)).decode(a)
        y.sum().backward()
    assert y.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_activation_and_penalties_equal_the_separate_functions(relu, autocast):
    """activation_with_losses = jumprelu (or relu) + tanh_sparsity + preact_loss: values and the
    gradients to h, θ and ‖W_dec‖, with an upstream ∂L/∂a as the decoder sends it."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if autocast else torch.float64
    pre0 = torch.randn(B, L, F, dtype=dtype, generator=g) * 0.3
    theta0 = torch.rand(L, F, dtype=dtype, generator=g) * 0.2 + 0.05
    norms0 = torch.rand(L, F, dtype=dtype, generator=g) + 0.5
    g_acts = torch.randn(B, L, F, dtype=dtype, generator=g)
    out = {}
    for fused in (True, False):
        pre, theta, norms = (t.clone().requires_grad_(True) for t in (pre0, theta0, norms0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h = pre.bfloat16() if autocast else pre  # as the encoder hands it over
            th = None if relu else theta
            if fused:
                acts, s, p = activation_with_losses(h, th, norms, 2.0, 0.2)
            else:
                acts = torch.relu(h) if relu else jumprelu(h, theta, 0.2)
                s, p = tanh_sparsity(acts, norms, 2.0), preact_loss(h, norms, th)
            ((acts.float() * g_acts).sum() + 0.7 * s + 0.3 * p).backward()
        out[fused] = (acts, s, p, pre.grad, theta.grad, norms.grad)
    for name, a, b in zip(("acts", "sparsity", "preact", "∂h", "∂θ", "∂n"), out[True], out[False],
                          strict=True):
        if name == "∂θ" and relu:
            assert a is None and b is None
            continue
        # under autocast the separate functions round ∂L/∂a to bf16, the fused one keeps fp32
        tol = {"rtol": 2e-2, "atol": 1e-2 * b.abs().max().item()} if autocast else {}
        torch.testing.assert_close(a, b, msg=name, **tol)
    assert relu or (out[True][4] != 0).any()  # the STE reached θ


def test_encoder_and_row_norm_functions_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    xT = torch.randn(3, 5, 4, dtype=torch.float64, generator=g).transpose(0, 1)  # as encode has it
    W = torch.randn(5, 6, 4, dtype=torch.float64, generator=g)
    b = torch.randn(5, 6, dtype=torch.float64, generator=g)
    for t in (xT, W, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(EncoderFn.apply, (xT, W, b))
    ref = torch.baddbmm(b[:, None], xT, W.transpose(1, 2))
    torch.testing.assert_close(EncoderFn.apply(xT, W, b), ref)
    Wd = torch.randn(6, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(row_norms, (Wd,))
    torch.testing.assert_close(row_norms(Wd), Wd.flatten(1).norm(dim=1))
    z = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)  # zero rows: gradient 0
    row_norms(z).sum().backward()
    assert (z.grad == 0).all()
    m = make()  # the whole step's parameter gradients are those of the plain formulas
    x = torch.randn(B, L, D, dtype=torch.float64)
    for fast in (True, False):
        m.zero_grad()
        if fast:
            pre, acts = m.encode(x)
            norms = m.decoder_norms()
        else:
            pre = torch.baddbmm(m.b_enc[:, None], x.transpose(0, 1), m.W_enc.transpose(1, 2))
            pre = pre.transpose(0, 1)
            acts = pre * (pre > m.threshold)
            norms = torch.stack([w.flatten(1).norm(dim=1) for w in m.W_dec])
        loss = (m.decode(acts).square().sum() + (torch.tanh(acts * norms)).sum()
                + torch.relu(m.threshold - pre).sum())
        loss.backward()
        if fast:
            fast_grads = grads(m)
    for name, g_ref in grads(m).items():  # θ: the STE gradient vs none through the mask
        if name != "log_threshold":
            torch.testing.assert_close(fast_grads[name], g_ref)


def test_encoder_under_autocast_matches_baddbmm():
    m = make(torch.float32)
    x = torch.randn(B, L, D)
    out = {}
    for fast in (True, False):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fast:
                pre = m._pre_layer_major(x)
            else:
                pre = torch.baddbmm(m.b_enc[:, None], x.transpose(0, 1), m.W_enc.transpose(1, 2))
        assert pre.dtype == torch.bfloat16
        pre.float().square().sum().backward()
        out[fast] = (pre.detach(), m.W_enc.grad.clone(), m.b_enc.grad.clone())
    assert out[True][1].dtype == torch.float32
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
