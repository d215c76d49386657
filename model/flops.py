"""Model FLOPs per trained token and model FLOPs utilization (MFU).

FLOPs per token = 6N + 12·L·T·d + the seed methods' own work, where N counts the weights used in
matmuls (attention, MLP and the LM head; not the embedding lookups), 6 = 2 (multiply-add) × 3
(forward, and backward for inputs and weights), and 12·L·T·d is attention's QKᵀ and AV over the
full T×T, as PaLM and nanoGPT count it (causal kernels skip about half of it: MFU by this count
is the convention, not the kernel's exact work). The methods add O(T·d) element-wise work (the
cumulative mean of C, the shaped gains, surgery's subtraction), counted at one FLOP per element
and pass, and spectral its per-layer QR of a d×d matrix (counted as Householder's 4d³/3 for R), once per
forward, that is per micro-batch. `tests/test_ecosystem.py` checks the
count against torch's FlopCounterMode.
"""

# dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 125.0), ("A10", 125.0),
               ("L4", 121.0), ("V100", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0)]


def matmul_parameters(cfg):
    d, L = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + 2 * cfg.mlp_ratio * d * d  # W_Q, W_K, W_V, W_O, MLP up and down
    return L * per_layer + cfg.vocab_size * d


def method_flops_per_token(cfg, tokens_per_forward):
    """What the seed methods add per token (forward and backward): element-wise passes over [T, d]."""
    d, L = cfg.d_model, cfg.n_layers
    passes = 0
    if cfg.attention == "gapfree":
        passes += 3  # cumulative sum, division, subtraction
    if cfg.attention == "shaped":
        passes += 8  # the cumulative mean, three gain products, two sums
    if cfg.surgery.site != "none":
        passes += 4
    flops = 3 * passes * d * L
    if cfg.weights == "spectral":  # one d×d QR and U·diag(λ) per layer per forward
        flops += 3 * L * (4 * d**3 / 3 + d * d) / tokens_per_forward
    return flops


def flops_per_token(cfg, seq_len, tokens_per_forward):
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * seq_len * cfg.d_model + method_flops_per_token(cfg, tokens_per_forward)


def peak_tflops(device_name, override=0.0):
    """The device's dense bf16 peak: train.peak_tflops if set, else by name (None if unknown)."""
    if override:
        return override
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in device_name), None)
