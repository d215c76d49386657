"""The one schema of Fathom's configuration: keys, types, defaults, allowed values and help.

Everything that reads a config (train.py, monitors.probe, the tests, the key table in docs/configuration.md) goes through
these dataclasses. This module imports no torch, so a bad config fails in a fraction of a second.
Each field's metadata may hold `help`, `choices` and `check` (a predicate plus the text naming
what is allowed); `configs.load` turns a violation into one line naming the key.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


def opt(default, help, choices=None, check=None, run_only=False):
    """A config field: its default, its help line and what values it allows. `run_only` marks a key
    that manages or records a run (where it writes, when it saves) and never changes the trained
    weights or the losses logged: two runs that differ only there are the same experiment."""
    meta = {"help": help, "run_only": run_only}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    return field(default=default, metadata=meta)


def sub(cls, help):
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


positive = (lambda v: v > 0, "a number > 0")
non_negative = (lambda v: v >= 0, "a number >= 0")
unit_interval = (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


@dataclass
class SurgeryConfig:
    site: str = opt(
        "none",
        "similarity surgery S(X) = X - tau * cummean(X) (Yu & Zhang): where it is applied",
        choices=("none", "attn_out", "residual", "block"),
    )
    tau: float = opt(0.5, "fraction of the causal token mean that surgery removes", check=unit_interval)


@dataclass
class SpectralConfig:
    mode: str = opt(
        "sharpen",
        "eigenvalues of W_V W_O (Dovonon et al.): sharpen = [-max,-min], smooth = [min,max], free = psi",
        choices=("sharpen", "smooth", "free"),
    )
    lambda_min: float = opt(0.0, "smallest |eigenvalue| of W_V W_O", check=non_negative)
    lambda_max: float = opt(1.0, "largest |eigenvalue| of W_V W_O", check=positive)
    init: str = opt("spread", "eigenvalues at init: spread = |lambda| uniform over [lambda_min, lambda_max]; equal = "
                    "all init_lambda (then W_V W_O = -init_lambda I: surgery-like at init)", choices=("spread", "equal"))
    init_lambda: float = opt(0.5, "|eigenvalue| of W_V W_O at init with spectral.init=equal", check=positive)


@dataclass
class ShapedConfig:
    temperature: str = opt("head", "attention temperature: head = tau0 sqrt(d_head) (He & Hofmann's causal practice), "
                           "width = tau0 sqrt(d_model d_head) (Noci et al.)", choices=("head", "width"))
    tau0: float = opt(1.0, "multiplies the attention temperature", check=positive)
    branch_gain: float = opt(1.0, "gain on the attention branch before the residual add", check=positive)
    mlp_gain: float = opt(0.42, "MLP branch gain = mlp_gain / sqrt(n_layers) (0.1 at 18 layers)", check=positive)
    trainable_gains: bool = opt(True, "train the per-head alpha, beta, gamma of shaped attention")
    trainable_branch_gains: bool = opt(True, "train the attention and MLP branch gains (He & Hofmann), starting at "
                                             "branch_gain and mlp_gain / sqrt(n_layers)")


@dataclass
class DepthScalingConfig:
    alpha: float = opt(0.0, "multiply every residual branch by (base_layers / n_layers)^alpha, with the optimizer rules "
                       "that go with it (model/residual.py): 0 = off, 0.5 = depth-muP, 1 = CompleteP",
                       check=unit_interval)
    base_layers: int = opt(12, "the depth at which depth scaling changes nothing: tune train.lr there", check=positive)
    optimizer_rules: bool = opt(True, "with alpha > 0, also scale the branch parameters' lr, AdamW eps and weight decay "
                                      "(model/optimizer_groups.py); false = the branch multiplier alone")
    stack_norm_rule: bool = opt(False, "with alpha > 0 and optimizer_rules, the LayerNorms after each residual add "
                                       "(post-norm, DeepNorm) train at lr x base_layers/n_layers: their affine maps "
                                       "compose over the stack (model/optimizer_groups.py)")


@dataclass
class ModelConfig:
    n_layers: int = opt(32, "number of Transformer blocks", check=positive)
    d_model: int = opt(64, "width of the residual stream", check=positive)
    n_heads: int = opt(4, "attention heads; d_model must be divisible by it", check=positive)
    vocab_size: int = opt(8192, "vocabulary size (train.py sets it from the data's tokenizer)", check=positive)
    max_seq_len: int = opt(256, "positions of the learned position embedding", check=positive)
    mlp_ratio: int = opt(4, "MLP hidden width / d_model", check=positive)
    norm: str = opt(
        "post",
        "residual/norm scheme: post = LN(x + f(x)), pre = x + f(LN(x)), deepnorm = LN(alpha x + f(x))",
        choices=("post", "pre", "deepnorm"),
    )
    attention: str = opt(
        "softmax",
        "attention variant: softmax, gapfree = A - C (Naderi et al.), shaped = alpha I + beta A - gamma C (Noci et al.)",
        choices=("softmax", "gapfree", "shaped"),
    )
    weights: str = opt(
        "standard",
        "parameterization of W_V, W_O: standard, or spectral = U diag(lambda) U^T (Dovonon et al.)",
        choices=("standard", "spectral"),
    )
    init: str = opt(
        "gpt2",
        "weight init: gpt2 (std 0.02, residual projections 0.02/sqrt(2L)), normal (std 0.02 everywhere), fanin "
        "(std 1/sqrt(fan_in)), xavier",
        choices=("gpt2", "normal", "fanin", "xavier"),
    )
    qk_init: str = opt("base", "W_Q, W_K init: base = as model.init, xavier = Xavier-normal (Naderi et al.)",
                       choices=("base", "xavier"))
    head_bias: str = opt("log_unigram", "output bias of the LM head: none, zero, or log_unigram (log of the training split's "
                                 "token frequencies)", choices=("none", "zero", "log_unigram"))
    tie_embeddings: bool = opt(True, "share the token embedding with the LM head (GPT-2)")
    surgery: SurgeryConfig = sub(SurgeryConfig, "similarity surgery options")
    spectral: SpectralConfig = sub(SpectralConfig, "spectral parameterization options")
    shaped: ShapedConfig = sub(ShapedConfig, "shaped attention options")
    depth_scaling: DepthScalingConfig = sub(DepthScalingConfig, "one learning rate across depth (CompleteP's rule)")


@dataclass
class TrainConfig:
    max_steps: int = opt(600, "optimizer steps; the LR schedule ends here", check=positive)
    seq_len: int = opt(128, "tokens per training sequence (<= model.max_seq_len)", check=positive)
    micro_batch_size: int = opt(16, "sequences per rank per micro-step", check=positive)
    grad_accum: int = opt(1, "micro-steps per optimizer step", check=positive)
    lr: float = opt(2e-3, "peak learning rate of AdamW", check=positive)
    min_lr_ratio: float = opt(0.1, "final LR of the cosine decay as a fraction of train.lr", check=unit_interval)
    warmup_steps: int = opt(60, "linear warmup steps", check=non_negative)
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (not on norms, gains, biases)", check=non_negative)
    beta1: float = opt(0.9, "AdamW beta1", check=unit_interval)
    beta2: float = opt(0.98, "AdamW beta2", check=unit_interval)
    adam_eps: float = opt(1e-8, "AdamW epsilon (times the branch multiplier for the branch parameters under "
                                "model.depth_scaling)", check=positive)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", check=non_negative)
    seed: int = opt(1337, "seed of the weights and of the data order", check=non_negative)
    log_every: int = opt(10, "steps between metrics.jsonl lines", check=positive, run_only=True)
    eval_every: int = opt(200, "steps between validation passes (and one at the end)", check=positive)
    eval_batches: int = opt(8, "micro-batches per validation pass (the first windows of the val split)", check=positive)
    final_eval_windows: int = opt(1024, "after the last step, the loss on this many val windows, one drawn from each of "
                                        "as many equal stretches of the split with a fixed seed: the same windows for "
                                        "every run of a data set (0 = off)", check=non_negative, run_only=True)
    out_dir: str = opt("runs/default", "run directory: config.yaml, metrics.jsonl, tensorboard/", run_only=True)
    precision: str = opt(
        "auto", "auto = bf16 on CUDA, fp32 on CPU; fp16 uses dynamic loss scaling",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    global_batch: int = opt(
        0, "sequences per optimizer step, kept when the world size changes (grad_accum is derived); 0 = "
        "micro_batch_size x grad_accum x ranks", check=non_negative)
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    activation_checkpointing: int = opt(
        0, "recompute every k-th block in the backward pass instead of storing its activations (0 = off)",
        check=non_negative)
    offload_optimizer: bool = opt(False, "keep optimizer states on the CPU (ZeRO-Offload; needs zero_stage >= 1)")
    save_every: int = opt(0, "steps between checkpoints (0 = only at the end and when stopped)", check=non_negative, run_only=True)
    save_every_minutes: float = opt(0.0, "also checkpoint when this many minutes passed since the last save (0 = off)",
                                    check=non_negative, run_only=True)
    keep_last: int = opt(2, "complete checkpoints kept; older ones are deleted", check=positive, run_only=True)
    resume: str = opt("auto", "auto = newest complete checkpoint in out_dir (else start afresh), none, or a checkpoint path", run_only=True)
    allow_data_change: bool = opt(False, "let a resume continue with other data, train.seed or train.seq_len (the "
                                         "sample order then changes; refused otherwise)", run_only=True)
    overwrite: bool = opt(False, "let a fresh start use an out_dir that holds another run: that run is first renamed to "
                                 "OUT_DIR.replaced-<time> (nothing is deleted)", run_only=True)
    stop_at_step: int = opt(0, "save and exit cleanly after this step; the LR schedule still follows max_steps (0 = off)",
                            check=non_negative, run_only=True)
    time_limit_minutes: float = opt(0.0, "save and exit (code 75) before this invocation's wall time runs out (0 = off)",
                                    check=non_negative, run_only=True)
    max_bad_steps: int = opt(10, "stop (with a checkpoint of the last good state) after this many non-finite steps in a row",
                             check=positive)
    spike_factor: float = opt(
        0.0, "roll back to the newest checkpoint when a step's loss exceeds spike_factor x the mean of the last "
        "spike_window steps; the batches since that checkpoint are skipped (0 = off)", check=non_negative)
    spike_window: int = opt(20, "steps in the running mean that loss spikes are measured against", check=positive)
    inject_spike: str = opt("", "fault injection to test the rollback: LAYER:STEP[:COUNT] scales that block's output by 100",
                            check=(lambda v: v == "" or re.fullmatch(r"\d+:\d+(:\d+)?", v) is not None,
                                   "empty or LAYER:STEP[:COUNT], e.g. 3:100"))
    inject_nonfinite: str = opt("", "fault injection to test the guard: LAYER:STEP[:COUNT] makes that block's output NaN",
                                check=(lambda v: v == "" or re.fullmatch(r"\d+:\d+(:\d+)?", v) is not None,
                                       "empty or LAYER:STEP[:COUNT], e.g. 3:100"))
    deepspeed_config: str = opt("", "a DeepSpeed JSON file merged over the generated config (expert pass-through)")
    compile: bool = opt(False, "torch.compile each Transformer block (the first steps pay the compile time)")
    wandb_project: str = opt("", "also log to this Weights & Biases project (rank 0; one W&B run per out_dir, resumed "
                                 "after a restart; WANDB_MODE=offline works without a network)", run_only=True)
    peak_tflops: float = opt(0.0, "the device's dense bf16/fp16 peak for MFU (0 = known GPUs by name; none on CPU)",
                             check=non_negative, run_only=True)
    profile_steps: str = opt("", "record a torch.profiler trace of steps A..B (A:B) into out_dir/tensorboard",
                             check=(lambda v: v == "" or re.fullmatch(r"\d+:\d+", v) is not None
                                    and int(v.split(":")[0]) <= int(v.split(":")[1]), "empty or A:B with A <= B, e.g. 10:12"), run_only=True)


@dataclass
class DataConfig:
    path: str = opt("", "directory written by `python -m data.prepare`; empty = the built-in stdlib corpus")
    mix: list = opt((), "directories written by `python -m data.prepare` with one tokenizer, mixed by relative weight, "
                    "e.g. [{path: data/web, weight: 0.7}, {path: data/code, weight: 0.3}] (data.path empty)",
                    check=(lambda v: all(isinstance(s, Mapping) and set(s) == {"path", "weight"} and isinstance(s["path"], str)
                                         and s["path"] and type(s["weight"]) in (int, float) and s["weight"] > 0 for s in v),
                           "a list of {path: DIR, weight: W} with W > 0"))
    cache_dir: str = opt("~/.cache/fathom", "where the built-in corpus is prepared once and reused", run_only=True)
    tokenizer: str = opt("bpe", "tokenizer of the built-in corpus: bpe (trained, data.vocab_size) or bytes (256 byte values "
                         "+ end-of-text)", choices=("bpe", "bytes"))
    vocab_size: int = opt(8192, "BPE vocabulary trained for the built-in corpus", check=(lambda v: v >= 260, "an integer >= 260"))


@dataclass
class MonitorConfig:
    every: int = opt(100, "steps between per-layer collapse measurements (also at step 0; 0 = off)", check=non_negative)
    collapse_threshold: float = opt(0.9, "a layer has collapsed when its token cosine similarity reaches this (or ...)",
                                    check=unit_interval)
    stable_rank_threshold: float = opt(1.2, "... when its stable rank falls to this (1 = all tokens on one direction); "
                                            "the monitors warn once per collapsed layer", check=(lambda v: v >= 1, "a number >= 1"))
    batch: int = opt(4, "held-out sequences in the probe batch", check=positive)
    seq_len: int = opt(0, "tokens per probe sequence (0 = train.seq_len); the attention metrics form a T×T matrix "
                          "per sequence and head, so a long train.seq_len is probed on a shorter window",
                       check=non_negative)
    heads: int = opt(0, "heads whose attention entropy and sigma_2/sigma_1 are measured, evenly spaced (0 = every "
                        "head)", check=non_negative)
    update_layers: int = opt(16, "blocks whose update-to-weight ratio is measured, evenly spaced with the first and "
                                 "last (0 = every block): each rank copies its own share of their fp32 weights before "
                                 "the step", check=non_negative, run_only=True)


# Raised whenever a change makes an older config.yaml mean something else; configs.saved_config
# reads older files as they ran (configs/__init__.py, SINCE).
SCHEMA_VERSION = 4


@dataclass
class FathomConfig:
    schema_version: int = opt(SCHEMA_VERSION, "the config format this file was written in (set by Fathom)",
                              check=(lambda v: v == SCHEMA_VERSION, f"{SCHEMA_VERSION}: older run configs are read "
                                     "with configs.saved_config"), run_only=True)
    model: ModelConfig = sub(ModelConfig, "the Transformer")
    train: TrainConfig = sub(TrainConfig, "the training run")
    data: DataConfig = sub(DataConfig, "the training data")
    monitor: MonitorConfig = sub(MonitorConfig, "per-layer collapse monitors")
