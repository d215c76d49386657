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
    at every step. U is the Q factor of a free matrix, computed in >= fp32 (CPU has no bf16 QR).
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

    def orthogonal_basis(self):
        q, r = torch.linalg.qr(self.basis.to(torch.promote_types(self.basis.dtype, torch.float32)))
        # fix the signs so U is a smooth, unique function of the free matrix
        return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)

    def forward(self):
        u = self.orthogonal_basis().to(self.basis.dtype)
        return u.T, u * self.eigenvalues().to(u.dtype)


VALUE_OUTPUT = {"standard": StandardValueOutput, "spectral": SpectralValueOutput}
