"""How W_V and W_O are produced: the *weight-parameterization seam* of the model.

A value/output module returns (w_value, w_output) in `F.linear` layout ([out, in]) once per
forward; attention computes v = x w_value^T and out = y w_output^T with them.
"""


import torch
import torch.nn as nn


class StandardValueOutput(nn.Module):
    """Free W_V and W_O."""

    def __init__(self, cfg):
        super().__init__()
        self.value = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.output = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self):
        return self.value.weight, self.output.weight


class SpectralValueOutput(nn.Module):
    """Spectrum-controlled W_V W_O (Dovonon, Bronstein & Kusner, arXiv 2401.04301).

    The paper analyses X <- X + A X H with H = W_V W_O: eigenvalues of H in [-1, 0) cannot
    oversmooth. Multi-head form: one orthogonal U per layer split by columns into heads,
    W_V^h = U_h and W_O^h = diag(lambda_h) U_h^T, so sum_h H_h = U diag(lambda) U^T is symmetric
    with exactly the eigenvalues lambda = +-clip(psi^2, lambda_min, lambda_max), by construction
    at every step. U is the Q factor (with R's diagonal positive) of a free matrix, in >= fp32.
    """

    SIGNS = {"sharpen": -1.0, "smooth": 1.0}

    def __init__(self, cfg):
        super().__init__()
        s = cfg.spectral
        self.mode, self.lambda_min, self.lambda_max = s.mode, s.lambda_min, s.lambda_max
        self.basis = nn.Parameter(torch.empty(cfg.d_model, cfg.d_model))
        nn.init.normal_(self.basis)
        if s.init == "spread":
            # equal eigenvalues make W_V W_O = -lambda I, and with near-uniform attention the branch is
            # then -lambda C X: similarity surgery. Uniform draws over the range start a real spectrum.
            magnitude = torch.empty(cfg.d_model).uniform_(s.lambda_min, s.lambda_max)
        else:
            magnitude = torch.full((cfg.d_model,), s.init_lambda)
        # free mode: lambda = psi itself, started with the sign of the sharpening regime
        self.psi = nn.Parameter(-magnitude if s.mode == "free" else magnitude.sqrt())

    def eigenvalues(self):
        if self.mode == "free":
            return self.psi
        return self.SIGNS[self.mode] * (self.psi**2).clamp(self.lambda_min, self.lambda_max)

    def forward(self):
        u = (cholesky_q if self.basis.is_cuda else householder_q)(self.basis).to(self.basis.dtype)
        return u.T, u * self.eigenvalues().to(u.dtype)


def householder_q(b):
    """The Q of b = QR with R's diagonal positive, by LAPACK's Householder QR in >= fp32 (CPU has no
    bf16 QR). Fixing the signs makes Q a smooth, unique function of b."""
    q, r = torch.linalg.qr(b.to(torch.promote_types(b.dtype, torch.float32)))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def cholesky_q(b):
    """The same Q by shifted Cholesky QR 3 (Fukaya et al., SIAM J. Sci. Comput. 2020): three passes of
    R = chol(qᵀq), q ← q R⁻¹, in fp64, the first with qᵀq shifted up so it factors for any condition
    number below 1/eps; each later pass restores orthogonality. The product of the R's is the
    positive-diagonal R, so Q is the Householder one. A GPU runs a 1024×1024 Householder QR as a chain
    of small panel kernels (not batched above n = 256), once per layer per forward; these are 3 Gram
    matmuls, Choleskys and triangular solves. One unshifted pass loses orthogonality as κ²·eps, past
    1e-5 at κ = 1e6; a Gaussian n×n basis has P(κ > K) ≈ 2n/K, so at n = 1,024 one of 1,000 layers
    starts past 1e6 nine times in ten."""
    return CholeskyQ.apply(b)


class CholeskyQ(torch.autograd.Function):
    """cholesky_q with QR's own backward: autograd through the three passes would keep every pass's
    fp64 q and R (56 bytes per d² and layer, 7× Householder's); this keeps Q and R in fp32 (8)."""

    @staticmethod
    def forward(ctx, b):
        dtype, q = torch.promote_types(b.dtype, torch.float32), b.double()
        n = q.shape[-1]
        # ‖b‖_F² bounds ‖b‖₂²; the shift's size is the paper's
        shift = 11 * (2 * n * n + n) * torch.finfo(q.dtype).eps * q.square().sum()
        eye = torch.eye(n, dtype=q.dtype, device=q.device)
        r_all, failed = eye, torch.zeros((), dtype=torch.bool, device=q.device)
        for s in (shift, 0.0, 0.0):
            r, info = torch.linalg.cholesky_ex(q.T @ q + s * eye, upper=True)
            q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
            r_all, failed = r @ r_all, failed | (info != 0)
        # a failed Cholesky leaves finite garbage: made non-finite (without asking the host) so the
        # trainer's non-finite guard stops the step
        q = torch.where(failed, torch.nan, q).to(dtype)
        ctx.save_for_backward(q, r_all.to(dtype))
        return q

    @staticmethod
    def backward(ctx, grad_q):
        # b = QR, Q square: dQ = QΩ with Ω = tril(X, -1) − tril(X, -1)ᵀ, X = Qᵀ db R⁻¹, so
        # db̄ = Q tril(Qᵀ Q̄ − Q̄ᵀ Q, −1) R⁻ᵀ
        q, r = ctx.saved_tensors
        g = q.T @ grad_q.to(q.dtype)
        return torch.linalg.solve_triangular(r.T, q @ (g - g.T).tril(-1), upper=False, left=False)


VALUE_OUTPUT = {"standard": StandardValueOutput, "spectral": SpectralValueOutput}
