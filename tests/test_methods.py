"""The tests of METHODS.md, in float64: each method's equation, causality and init properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from model import Transformer
from model.attention import MIXERS, CausalSelfAttention, chunked_cumsum, cumulative_mean
from model.residual import SimilaritySurgery, Unchanged
from model.weights import cholesky_q, householder_q
from monitors.metrics import t_sim

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def model_config(*overrides, preset=None):
    paths = [f"configs/methods/{preset}.yaml"] if preset else []
    base = ["model.n_layers=3", "model.d_model=16", "model.n_heads=4", "model.vocab_size=50", "model.max_seq_len=32", "train.seq_len=32"]
    return load_config(paths, base + list(overrides)).model


def causal_uniform(T):
    """C built by hand: C_ij = 1/i for j <= i (1-based)."""
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1).unsqueeze(1)


def softmax_matrix(q, k, scale):
    T = q.shape[-2]
    logits = q @ k.transpose(-1, -2) * scale
    return torch.softmax(logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf), -1)


def qkv(B=2, H=4, T=9, dh=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, dh, generator=g) for _ in range(3)]


# ---- C, the causal uniform matrix -------------------------------------------------------------


def test_cumulative_mean_is_C_times_v():
    T = 7
    C = causal_uniform(T)
    assert torch.allclose(C.sum(-1), torch.ones(T))
    assert torch.all(torch.triu(C, 1) == 0)
    assert torch.allclose(C, softmax_matrix(torch.zeros(1, T, 2), torch.zeros(1, T, 2), 1.0)[0])
    v = torch.randn(3, T, 5)
    assert torch.allclose(cumulative_mean(v), C @ v, atol=1e-12)


@pytest.mark.parametrize("shape,dim,chunk", [((3, 7, 5), -2, 4), ((2, 3, 7, 4), 2, 3), ((2, 3, 7, 4), 1, 2),
                                             ((2, 4, 2048, 16), -2, 64), ((2, 5, 8), 1, 64)])
def test_the_chunked_cumsum_equals_torch_cumsum(shape, dim, chunk):
    """cumulative_mean's GPU path (matmuls, no scan), run here on the CPU: equal to torch.cumsum within
    fp32 rounding, for chunks that divide T, that do not, and that exceed it."""
    x = torch.randn(shape, dtype=torch.bfloat16)
    exact = torch.cumsum(x.double(), dim=dim)
    chunked = chunked_cumsum(x, dim, torch.float32, chunk)
    assert chunked.dtype == torch.float32 and chunked.shape == exact.shape
    scale = x.double().abs().cumsum(dim)  # fp32 rounding grows with the running sum of magnitudes
    assert torch.all((chunked.double() - exact).abs() <= 1e-6 * scale + 1e-6)


# ---- 1. equations: the SDPA path equals the explicit T×T formula ------------------------------


def test_softmax_equation():
    q, k, v = qkv()
    mixer = MIXERS["softmax"](model_config())
    expected = softmax_matrix(q, k, 1 / math.sqrt(q.shape[-1])) @ v
    assert torch.allclose(mixer(q, k, v), expected, atol=1e-10)


def test_gapfree_equation_rows_sum_to_zero_and_first_position_is_zero():
    q, k, v = qkv()
    mixer = MIXERS["gapfree"](model_config("model.attention=gapfree"))
    A = softmax_matrix(q, k, 1 / math.sqrt(q.shape[-1])) - causal_uniform(q.shape[-2])
    assert torch.allclose(A.sum(-1), torch.zeros(A.shape[:-1]), atol=1e-12)
    out = mixer(q, k, v)
    assert torch.allclose(out, A @ v, atol=1e-10)
    assert torch.all(out[:, :, 0] == 0)


@pytest.mark.parametrize("temperature", ["head", "width"])
def test_shaped_equation_with_nontrivial_gains(temperature):
    cfg = model_config("model.attention=shaped", f"model.shaped.temperature={temperature}", "model.shaped.tau0=1.3")
    mixer = MIXERS["shaped"](cfg)
    with torch.no_grad():
        mixer.alpha.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        mixer.beta.copy_(torch.tensor([1.0, 0.3, 2.0, 0.7]))
        mixer.gamma.copy_(torch.tensor([0.2, 0.9, 1.1, 0.4]))
    q, k, v = qkv()
    T, d_head = q.shape[-2], q.shape[-1]
    tau = 1.3 * math.sqrt((cfg.d_model if temperature == "width" else 1) * d_head)
    g = lambda p: p.view(1, -1, 1, 1)  # noqa: E731
    A = g(mixer.alpha) * torch.eye(T) + g(mixer.beta) * softmax_matrix(q, k, 1 / tau) - g(mixer.gamma) * causal_uniform(T)
    assert torch.allclose(mixer(q, k, v), A @ v, atol=1e-10)


def test_surgery_equation_and_full_mean_removes_all_similarity():
    x = torch.randn(2, 8, 6) + 3.0  # a large shared mean: t_sim near 1
    assert t_sim(x) > 0.5
    surgery = SimilaritySurgery(tau=0.7)
    assert torch.allclose(surgery(x), x - 0.7 * causal_uniform(8) @ x, atol=1e-12)
    assert t_sim(x - x.mean(1, keepdim=True)) < 1e-20  # non-causal mean, tau = 1


# ---- 2. causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_causality_of_outputs_and_gradients(preset):
    torch.manual_seed(0)
    model = Transformer(model_config("model.init=fanin", preset=preset))
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50

    def run(tokens):
        model.zero_grad()
        logits = model(tokens)
        logits[:, :7].pow(2).sum().backward()  # a loss of positions < 7 only
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_a, grads_a = run(idx)
    logits_b, grads_b = run(changed)
    assert torch.allclose(logits_a[:, :7], logits_b[:, :7], atol=1e-12)
    assert not torch.allclose(logits_a[:, 7:], logits_b[:, 7:])
    for name, grad in grads_a.items():
        # embeddings of the changed tokens get different (zero vs non-zero) rows; everything else is equal
        if name not in ("token_embedding.weight",):
            assert torch.allclose(grad, grads_b[name], atol=1e-10), name


@pytest.mark.parametrize("preset", PRESETS)
def test_no_position_is_constant_across_inputs(preset):
    """Causal pitfall of surgery (tau = 1 at the residual site) and gap removal: position 1 must
    still carry its token to the logits."""
    torch.manual_seed(0)
    model = Transformer(model_config("model.init=fanin", preset=preset))
    a, b = model(torch.randint(0, 50, (1, 6))), model(torch.randint(0, 50, (1, 6)))
    assert (a - b).abs().amax(-1).min() > 1e-6


# ---- 4. shaped attention at init ------------------------------------------------------------


def test_shaped_attention_is_alpha_times_values_at_init():
    cfg = model_config(preset="shaped")
    attn = CausalSelfAttention(cfg, out_transform=Unchanged())
    torch.nn.init.normal_(attn.query_key.weight)
    attn.query_key.weight.data[: cfg.d_model] = 0  # W_Q = 0, as init.py does
    with torch.no_grad():
        attn.mixer.alpha.fill_(1.7)
    x = torch.randn(2, 10, cfg.d_model)
    w_v, w_o = attn.value_output()
    assert torch.allclose(attn(x), F.linear(1.7 * F.linear(x, w_v), w_o), atol=1e-12)


def test_shaped_model_zeroes_queries_at_init():
    model = Transformer(model_config(preset="shaped"))
    for block in model.blocks:
        assert torch.all(block.attn.query_key.weight[:16] == 0)
        assert torch.any(block.attn.query_key.weight[16:] != 0)


# ---- 7. spectral parameterization ------------------------------------------------------------


def spectral_checks(vo, lo, hi, sign):
    w_value, w_output = vo()
    U = w_value.T
    assert torch.allclose(U.T @ U, torch.eye(U.shape[0]), atol=1e-10)
    H = w_value.T @ w_output.T  # W_V W_O in x @ W layout
    assert torch.allclose(H, H.T, atol=1e-10)
    eig = torch.linalg.eigvalsh(H)
    assert torch.all(sign * eig >= lo - 1e-9) and torch.all(sign * eig <= hi + 1e-9)
    for h in range(4):  # per head: H_h = U_h diag(lambda_h) U_h^T
        cols = slice(4 * h, 4 * h + 4)
        Hh = U[:, cols] @ torch.diag(vo.eigenvalues()[cols]) @ U[:, cols].T
        assert torch.allclose(Hh, Hh.T, atol=1e-12)


@pytest.mark.parametrize("mode,sign", [("sharpen", -1.0), ("smooth", 1.0)])
def test_spectral_eigenvalues_hold_after_optimizer_steps(mode, sign):
    torch.manual_seed(0)
    cfg = model_config(f"model.spectral.mode={mode}", "model.spectral.lambda_min=0.1",
                       "model.spectral.lambda_max=0.9", preset="spectral")
    model = Transformer(cfg)
    vo = model.blocks[0].attn.value_output
    spectral_checks(vo, 0.1, 0.9, sign)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randint(0, 50, (2, 10))).pow(2).mean().backward()
        assert vo.basis.grad.abs().sum() > 0 and vo.psi.grad.abs().sum() > 0
        opt.step()
    spectral_checks(vo, 0.1, 0.9, sign)


@pytest.mark.parametrize("d,kappa,dtype", [(64, None, torch.float32), (256, None, torch.bfloat16),
                                           (256, 1e5, torch.float32), (256, 1e12, torch.float32)])
def test_the_cholesky_q_is_the_householder_q(d, kappa, dtype):
    """Spectral's GPU path (shifted Cholesky QR 3 in fp64), run here on the CPU: orthogonal to 1e-5 in
    fp32 for any conditioning, and the Q and gradient of the sign-fixed Householder QR in fp64."""
    torch.manual_seed(0)
    b = torch.randn(d, d, dtype=torch.float64)
    if kappa:
        u, v = torch.linalg.qr(b)[0], torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
        b = u * torch.logspace(0, -math.log10(kappa), d, dtype=torch.float64) @ v.T
    b, seed = b.to(dtype), torch.randn(d, d, dtype=torch.float64)
    exact = b.double().requires_grad_()
    exact_q = householder_q(exact)
    (exact_q * seed).sum().backward()
    leaf = b.clone().requires_grad_()
    q = cholesky_q(leaf)
    (q * seed).sum().backward()
    assert q.dtype == torch.float32 and (q.T @ q - torch.eye(d, dtype=q.dtype)).abs().max() < 1e-5
    assert (q - exact_q).abs().max() < 1e-5
    if not kappa:  # a bf16 basis gets its gradient rounded to bf16 (2⁻⁸ relative)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert (leaf.grad - exact.grad).abs().max() < tolerance * exact.grad.abs().max()


def test_the_cholesky_q_keeps_one_q_and_r_and_flags_a_failed_factor():
    """Its backward keeps Q and R in fp32 (what the Householder path keeps), not each pass's fp64
    factors; a basis whose Gram matrix does not factor gives non-finite weights, for the step guard."""
    saved = []
    b = torch.randn(64, 64, dtype=torch.float32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cholesky_q(b)
    assert sum(t.numel() * t.element_size() for t in saved) <= 8 * 64 * 64
    singular = torch.randn(64, 64, dtype=torch.float32)
    singular[:, 3] = 0
    assert not torch.isfinite(cholesky_q(singular)).any()


# ---- init properties -------------------------------------------------------------------------


def test_deepnorm_constants_and_beta_init():
    L = 3
    model = Transformer(model_config(preset="deepnorm"))
    join = model.blocks[0].attn_residual
    assert join.alpha == pytest.approx((2 * L) ** 0.25)
    torch.manual_seed(0)
    xavier = Transformer(model_config("model.init=xavier"))
    torch.manual_seed(0)
    deep = Transformer(model_config(preset="deepnorm"))
    beta = (8 * L) ** -0.25
    b0, d0 = xavier.blocks[1], deep.blocks[1]
    for name in ("attn.value_output.value.weight", "attn.value_output.output.weight", "mlp.up.weight", "mlp.down.weight"):
        assert torch.allclose(dict(d0.named_parameters())[name], beta * dict(b0.named_parameters())[name])
    assert torch.equal(d0.attn.query_key.weight, b0.attn.query_key.weight)


def test_gpt2_init_scales_the_residual_projections_by_depth():
    """0.02 for W_Q and the other matrices; 0.02/sqrt(2L) for the two that write into the stream."""
    L = 8
    torch.manual_seed(0)
    cfg = load_config(["configs/methods/vanilla.yaml"], [f"model.n_layers={L}", "model.d_model=128", "model.n_heads=4",
                                                         "model.init=gpt2"]).model
    blocks = Transformer(cfg).blocks
    stds = {name: p.std().item() for name, p in blocks.named_parameters()}
    query = [block.attn.query_key.weight[:128].std().item() for block in blocks]
    for name, std in stds.items():
        if name.endswith(("attn.value_output.output.weight", "mlp.down.weight")):
            assert std == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05), name
        elif name.endswith(("value.weight", "mlp.up.weight")):
            assert std == pytest.approx(0.02, rel=0.05), name
    assert query == pytest.approx([0.02] * L, rel=0.05)


@pytest.mark.parametrize("scheme,std", [("gpt2", 0.02), ("fanin", 1 / math.sqrt(64))])
def test_init_scheme_std(scheme, std):
    torch.manual_seed(0)
    cfg = load_config([], ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", f"model.init={scheme}"]).model
    w = Transformer(cfg).blocks[0].attn.query_key.weight
    assert w.std().item() == pytest.approx(std, rel=0.05)


# ---- cached decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS + ["surgery-attn_out", "surgery-block", "pre-surgery"])
def test_cached_decoding_equals_the_full_forward_pass(preset):
    from model.decode import DecodeCache

    extra = {"surgery-attn_out": ("surgery", ["model.surgery.site=attn_out"]),
             "surgery-block": ("surgery", ["model.surgery.site=block"]),
             "pre-surgery": ("pre", ["model.surgery.site=residual"])}
    name, overrides = extra.get(preset, (preset, []))
    torch.manual_seed(0)
    model = Transformer(model_config("model.init=fanin", *overrides, preset=name)).eval()
    with torch.no_grad():  # trained-looking gains, so every term of the shaped attention matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 50, (2, 14))
    full = model(idx)
    cache = DecodeCache()
    pieces = [model(idx[:, :5], cache), model(idx[:, 5:8], cache)]  # a prompt, then a chunk of 3
    pieces += [model(idx[:, t : t + 1], cache) for t in range(8, 14)]  # then one token at a time
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-9, rtol=0)
