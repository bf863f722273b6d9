"""Typed configuration: dataclass schema, YAML files that extend a base, dotted overrides.

A config file only says what differs from the defaults below. ``extends: base.yaml`` pulls in
another file first (paths relative to the extending file). Command-line overrides use dotted
keys (``model.num_layers=4``); values are parsed as YAML scalars. Every field has a docstring
(``doc=`` in its metadata); unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import pathlib
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message says what and how to fix it."""


def _field(default: Any, doc: str):
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


class Schedule(str, enum.Enum):
    """Noise schedule families alpha(t) (probability that a token is still clean at time t)."""

    LINEAR = "linear"
    COSINE = "cosine"
    POLYNOMIAL = "polynomial"
    LOGLINEAR = "loglinear"


class Layout(str, enum.Enum):
    """Training input layout of a hyperschedule."""

    SINGLE = "single"
    DOUBLE = "double"


class Sampler(str, enum.Enum):
    """Generation algorithms."""

    ANCESTRAL = "ancestral"
    ACS = "acs"
    PARALLEL = "parallel"


class Score(str, enum.Enum):
    """How a parallel decoder ranks masked positions."""

    CONFIDENCE = "confidence"
    TOP1 = "top1"
    MARGIN = "margin"
    ENTROPY = "entropy"


class CommitRule(str, enum.Enum):
    """How many ranked positions a parallel decoder commits per step."""

    TOPK = "topk"
    THRESHOLD = "threshold"
    FACTOR = "factor"


class DecodeCache(str, enum.Enum):
    NONE = "none"
    PREFIX = "prefix"
    DUAL = "dual"


class Process(str, enum.Enum):
    """Corruption kernels."""

    ABSORBING = "absorbing"
    EPSILON_HYBRID = "epsilon_hybrid"
    GAMMA_HYBRID = "gamma_hybrid"


class HyperscheduleKind(str, enum.Enum):
    """Per-position noise schedule: flat (MDLM), autoregressive, block(w), slide(w), block_slide(w) (the hybrid)."""

    FLAT = "flat"
    AUTOREGRESSIVE = "autoregressive"
    BLOCK = "block"
    SLIDE = "slide"
    BLOCK_SLIDE = "block_slide"


class TimeMode(str, enum.Enum):
    """Continuous-time NELBO, or the discrete-time NELBO over `num_steps` steps."""

    CONTINUOUS = "continuous"
    DISCRETE = "discrete"


class Source(str, enum.Enum):
    """Where training text comes from."""

    BUILTIN = "builtin"
    FILES = "files"
    HF = "hf"
    TFDS = "tfds"
    MARKOV = "markov"
    SUDOKU = "sudoku"
    ADDITION = "addition"
    SHARDS = "shards"  # ArrayRecord shards written by dlm.data.prepare


class DataFormat(str, enum.Enum):
    """How records become training rows."""

    STREAM = "stream"  # documents packed into rows; every position is noised and scored
    PAIRS = "pairs"  # one prompt/response record per row; the prompt is a condition (never masked, never scored)


class MarkovStructure(str, enum.Enum):
    DIRICHLET = "dirichlet"
    CYCLE = "cycle"


class TokenizerKind(str, enum.Enum):
    BYTE = "byte"
    BPE = "bpe"
    PRETRAINED = "pretrained"


class Remat(str, enum.Enum):
    """Rematerialisation policy of each transformer block."""

    NONE = "none"
    FULL = "full"
    DOTS = "dots"


class NonFinitePolicy(str, enum.Enum):
    """What a non-finite loss or gradient does: skip the update (and count it), or stop the run."""

    SKIP = "skip"
    STOP = "stop"


class TrainMode(str, enum.Enum):
    """What train.py optimises: the diffusion objective on data, or rewards of a task's checker."""

    SFT = "sft"
    RL = "rl"


class Estimator(str, enum.Enum):
    """How the RL loss estimates log pi(response | prompt) (dlm.rl.estimators)."""

    ELBO = "elbo"
    D1 = "d1"
    COUPLED = "coupled"
    SANDWICH = "sandwich"
    TRACE = "trace"


class Reward(str, enum.Enum):
    """The reward of a rollout from the task's checker."""

    EXACT = "exact"
    CELLS = "cells"


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class TimeGrid(str, enum.Enum):
    """Time grid of the ancestral sampler (MD4: cosine grid works better with a linear schedule)."""

    UNIFORM = "uniform"
    COSINE = "cosine"


ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "chunked", "xla", "cudnn", "splash")


@dataclasses.dataclass
class MoEConfig:
    experts: int = _field(0, "Routed experts of each mixture-of-experts feed-forward; 0 = a dense feed-forward.")
    top_k: int = _field(2, "Experts each token goes to.")
    expert_dim: int = _field(0, "Hidden width of each expert's SwiGLU (and of each shared expert); 0 = the dense width (model.mlp_dim).")
    renormalize: bool = _field(True, "Renormalise the top-k softmax gates to sum to 1 (Qwen3-MoE's norm_topk_prob, SDAR-MoE); false keeps the raw probabilities (LLaDA-MoE, OLMoE).")
    shared_experts: int = _field(0, "Shared experts every token goes through besides its routed ones, computed as one SwiGLU of shared_experts x expert_dim hidden units.")
    dense_layers: int = _field(0, "The first blocks that keep the dense feed-forward (model.mlp_dim).")
    load_balance: float = _field(0.01, "Weight of the load-balancing loss E * sum_e f_e P_e (1 at uniform routing) in the training loss.")
    router_z: float = _field(0.001, "Weight of the router z-loss mean logsumexp(router logits)^2 in the training loss.")
    impl: str = _field("tiles", "Grouped matmul of the experts: tiles (rows sorted by expert, one batched product over tiles of rows with their expert's matrix) or ragged (jax.lax.ragged_dot).")
    router: str = _field("softmax", "Router scores: softmax (top-k of the softmax; Qwen3-MoE, LLaDA-MoE) or sigmoid (top-k of sigmoid scores plus expert_bias, the gates the unbiased scores; DeepSeek-V3, LLaDA2).")
    groups: int = _field(1, "Sigmoid router: experts in this many groups; a token's experts come from its group_top_k groups with the largest sums of their two best scores (1: no groups).")
    group_top_k: int = _field(1, "Sigmoid router: groups each token's experts may come from.")
    route_scale: float = _field(1.0, "Factor on the routed experts' gates (LLaDA2's routed_scaling_factor 2.5).")
    expert_bias: bool = _field(False, "Sigmoid router: a per-expert bias added to the scores for choosing experts only (aux-loss-free balancing; not trained by the gradient or decayed).")
    capacity_factor: float = _field(0.0, "Expert parallelism (mesh.expert > 1): rows each device sends each expert shard, as a multiple of its fair share (assignments / shards); 0 = every assignment (dropless, exact); above 0 assignments past the capacity are dropped.")


@dataclasses.dataclass
class ModelConfig:
    d_model: int = _field(128, "Residual stream width.")
    num_layers: int = _field(4, "Number of transformer blocks (stacked with nnx.scan).")
    num_heads: int = _field(4, "Attention heads; d_model must be divisible by it.")
    mlp_dim: int = _field(0, "SwiGLU hidden width; 0 means 8/3 * d_model rounded up to a multiple of 32.")
    noise_conditioning: bool = _field(False, "Condition every block on the per-token noise level t (adaLN).")
    remat: Remat = _field(Remat.NONE, "Rematerialise blocks in the backward pass: none, full or dots.")
    dtype: DType = _field(DType.FLOAT32, "Compute dtype of matmuls (parameters stay float32).")
    rope_theta: float = _field(10000.0, "RoPE base frequency.")
    embed_init_std: float = _field(1.0, "Std of the token-embedding init (N(0, 1) trains much faster than small inits).")
    attention: str = _field("auto", "Attention implementation: auto (einsum while queries x keys <= (2 x attention_chunk)^2, chunked above), einsum (whole score matrix; fastest on CPU for short sequences), chunked (online-softmax tiles, O(L x chunk) memory), xla / cudnn (jax.nn.dot_product_attention; cuDNN flash on GPU), splash (Pallas TPU kernel).")
    attention_chunk: int = _field(512, "Query / key tile of the chunked attention.")
    logits_chunk: int = _field(0, "Positions per chunk of the losses' vocabulary-sized work (logits, softmax): 0 = as many as fit in 64 MB of float32 logits.")
    learned_positions: int = _field(0, "Learned absolute position embeddings for this many positions, added to the token embedding (0: none; RoPE is applied either way).")
    family: str = _field("dlm", "The architecture's name: dlm (trained here), or a published family imported by dlm.convert (llada, dream, mdlm); export reads it.")
    vocab_size: int = _field(0, "Logit columns (imported families: the checkpoint's vocabulary, mask included); 0 = the tokenizer's vocabulary.")
    mask_id: int = _field(-1, "The mask token's id: -1 = vocab_size, appended after the vocabulary (models trained here); an id inside the vocabulary for imported families (LLaDA 126336, Dream 151666), whose logit is never predicted.")
    num_kv_heads: int = _field(0, "Key/value heads (grouped-query attention); 0 = num_heads. Must divide num_heads.")
    qkv_bias: bool = _field(False, "Biases on the query, key and value projections (Dream, Qwen2).")
    rope_fraction: float = _field(1.0, "Partial RoPE: the fraction of each head's dimensions rotated (the first ones; LLaDA2 0.5), the rest passed through.")
    qk_norm: bool = _field(False, "QK-norm: a per-head RMSNorm (one scale of head_dim, shared by the heads) on the queries and keys before RoPE (Qwen3, SDAR).")
    norm: str = _field("rms", "Normalisation: rms (RMSNorm) or layer (LayerNorm without bias, MDLM's DiT).")
    norm_eps: float = _field(1e-6, "Epsilon of the normalisation.")
    mlp: str = _field("swiglu", "Feed-forward: swiglu (gate, up, down; no biases) or gelu (GELU-tanh between two biased layers, MDLM's DiT).")
    block: str = _field("prenorm", "Block: prenorm (x + f(norm(x))) or dit (adaLN: shift, scale and gate of both sublayers and a shift/scale of the final norm, from a conditioning vector c = silu(sigma_map(sigma = 0)); MDLM-OWT).")
    cond_dim: int = _field(128, "Width of the DiT conditioning vector.")
    shift_logits: bool = _field(False, "Position i's logits come from position i - 1's hidden state (position 0's from its own): Dream's AR-aligned prediction.")
    grid: list = _field([], "A task's 2-D structure [rows, cols, box_rows, box_cols] or [rows, cols, box_rows, box_cols, pages]: learned row, column and box embeddings of each position (row-major) added to the token embedding, and with pages > 1 a page embedding (grids one after another, e.g. a puzzle then its solution); empty: none.")
    moe: MoEConfig = _field(None, "Mixture-of-experts feed-forward (dlm.models.moe): experts, routing, shared experts, dense first layers, training losses.")

    def __post_init__(self):
        if self.moe is None:
            self.moe = MoEConfig()


class PrimeObjective(str, enum.Enum):
    """What a Prime model trains on: the valid NELBO (bound) or the published joint objective."""

    BOUND = "bound"
    JOINT = "joint"


@dataclasses.dataclass
class PrimeConfig:
    l: int = _field(1, "Sub-tokens per token (MDM-Prime); 1 is plain masked diffusion. b = ceil(V^(1/l)).")
    objective: PrimeObjective = _field(PrimeObjective.BOUND, "Train on the valid NELBO (bound) or the published joint objective (joint); the bound is always reported as the NELBO.")


@dataclasses.dataclass
class DiffusionConfig:
    schedule: Schedule = _field(Schedule.LINEAR, "alpha(t) family: linear, cosine, polynomial, loglinear.")
    exponent: float = _field(2.0, "k of the polynomial schedule alpha = 1 - t^k.")
    loglinear_eps: float = _field(1e-3, "eps of the log-linear schedule alpha = 1 - (1 - eps) t.")
    process: Process = _field(Process.ABSORBING, "Corruption kernel (the mask id is vocab_size): absorbing, or epsilon_hybrid (masking plus uniform replacement with probability epsilon).")
    gamma: float = _field(0.01, "gamma_hybrid: share of the uniform rate in (1 - gamma) Q_absorb + gamma Q_uniform, in [0, 1).")
    epsilon: float = _field(0.01, "epsilon_hybrid: probability that a token is replaced by a uniform draw before masking, in [0, 1).")
    time: TimeMode = _field(TimeMode.CONTINUOUS, "continuous-time NELBO or discrete-time with num_steps.")
    num_steps: int = _field(1000, "T of the discrete-time NELBO.")
    antithetic: bool = _field(True, "Antithetic (stratified) time draws across the batch: t_i = (u + i/B) mod 1.")
    t_min: float = _field(1e-5, "Smallest time drawn (keeps the weight finite; its bias is below float precision).")
    prime: PrimeConfig = _field(None, "Partial masking (MDM-Prime).")
    hyperschedule: HyperscheduleKind = _field(HyperscheduleKind.FLAT, "Per-position noise: flat (MDLM), autoregressive, block, slide or block_slide (blocks that overlap in time).")
    layout: Layout = _field(Layout.SINGLE, "Hyperschedule training input: single (one block active per row) or double ([clean | noised], every block at once, 2L tokens; not slide).")
    block_width: int = _field(16, "Block width (block, block_slide) or window width (slide); must divide data.seq_len.")
    block_steps: int = _field(4, "block_slide: steps per block of the training table; a block starts every block_steps // 2 steps.")

    def __post_init__(self):
        if self.prime is None:
            self.prime = PrimeConfig()


@dataclasses.dataclass
class SudokuConfig:
    size: int = _field(9, "Grid size n (9: 3x3 boxes, 6: 2x3 boxes, 4: 2x2); data.seq_len must be n * n.")
    base_grids: int = _field(2000, "Solved grids generated once (cached); every training row is a random symmetry of one of them.")
    validation: int = _field(256, "Held-out solved grids (another seed) for the validation NELBO.")
    seed: int = _field(0, "Seed of the base grids; held-out grids and evaluation puzzles use seeds derived from it.")
    cache_dir: str = _field("runs/cache", "Where generated grids and puzzles are cached (by size, seed, count and givens).")


@dataclasses.dataclass
class AdditionConfig:
    digits: int = _field(8, "n: both operands are uniform n-digit numbers (leading zeros allowed); rows are 3 x (n + 1) digits, least significant first.")
    validation: int = _field(512, "Held-out problems (another seed) for the validation NELBO.")
    seed: int = _field(0, "Seed of the training stream; held-out problems and evaluation sets use seeds derived from it.")


@dataclasses.dataclass
class MarkovConfig:
    num_states: int = _field(8, "K, the alphabet size of the chain.")
    structure: MarkovStructure = _field(MarkovStructure.DIRICHLET,
                                        "dirichlet (rows ~ Dirichlet(concentration)) or cycle (one likely successor per state "
                                        "along a random cycle; `branches` states also branch to a second successor).")
    concentration: float = _field(0.5, "Each transition row ~ Dirichlet(concentration) (structure=dirichlet).")
    branches: int = _field(0, "structure=cycle: states with a second likely successor (taken with probability U(0.1, 0.25)).")
    noise: float = _field(0.01, "structure=cycle: probability mass of every row spread uniformly over all states.")
    seed: int = _field(0, "Seed of the transition matrix.")
    num_train: int = _field(0, "Training sequences; 0 draws fresh sequences for every batch (infinite data).")
    num_validation: int = _field(2048, "Validation sequences.")


@dataclasses.dataclass
class DataConfig:
    source: Source = _field(Source.BUILTIN, "builtin (Python stdlib sources), files, hf, tfds, markov, sudoku (solved grids of dlm.tasks.sudoku), addition (dlm.tasks.addition) or shards (pre-tokenised ArrayRecord shards written by `python -m dlm.data.prepare`, in data.path).")
    path: str = _field("", "source=shards: the directory written by `python -m dlm.data.prepare --out DIR` (shards, metadata.json, tokenizer).")
    loader_threads: int = _field(2, "source=shards: threads that read rows from the shards ahead of the train step.")
    prefetch: int = _field(4, "source=shards: batches read ahead of the train step.")
    loader_workers: int = _field(0, "source=shards: worker processes that read batches (0: data.loader_threads threads in the training process); a worker that dies is replaced and its batch read again.")
    paths: list = _field([], "Local text or JSONL files (source=files); *.jsonl/*.json are read as JSON lines.")
    validation_paths: list = _field([], "Local validation files; empty means a deterministic split of `paths`.")
    text_field: str = _field("text", "Field holding the text in JSONL, HF and TFDS records.")
    hf_name: str = _field("", "HF datasets name (source=hf), e.g. 'wikitext'.")
    hf_config: str = _field("", "HF datasets config name, e.g. 'wikitext-2-raw-v1'.")
    tfds_name: str = _field("", "TFDS dataset name (source=tfds), read with tfds.data_source (no TensorFlow).")
    train_split: str = _field("train", "Split for training (hf, tfds).")
    validation_split: str = _field("validation", "Split for validation (hf, tfds); empty means hold out from train.")
    validation_mod: int = _field(50, "Held-out split: a document goes to validation when md5(name) % validation_mod == 0.")
    max_documents: int = _field(0, "Read at most this many documents per split (0 = all).")
    tokenizer: TokenizerKind = _field(TokenizerKind.BYTE, "byte (256 bytes + EOS), bpe (trained here), pretrained.")
    bpe_vocab_size: int = _field(4096, "Vocabulary size of the locally trained BPE tokenizer.")
    pretrained_tokenizer: str = _field("", "HF tokenizer name (tokenizer=pretrained), e.g. 'gpt2'.")
    seq_len: int = _field(256, "Tokens per packed row (the model context).")
    markov: MarkovConfig = _field(None, "Synthetic Markov source (source=markov).")
    sudoku: SudokuConfig = _field(None, "Sudoku grids (source=sudoku): the task of dlm.tasks.sudoku.")
    addition: AdditionConfig = _field(None, "Multi-digit addition (source=addition): the task of dlm.tasks.addition.")
    format: DataFormat = _field(DataFormat.STREAM, "stream: documents packed into rows, every position trained. pairs: one prompt/response record per row (the LLaDA SFT recipe): prompt positions are never masked and never scored, and the NELBO is -log p(response | prompt) per response token; a text record is prompt + response + EOS, padded with EOS (scored as response). Sources: files/hf (JSON fields data.prompt_field and data.response_field), sudoku (the puzzle, then its solution: seq_len 2 n^2), addition.")
    prompt_field: str = _field("prompt", "format=pairs: field holding the prompt in JSONL and HF records.")
    response_field: str = _field("response", "format=pairs: field holding the response in JSONL and HF records.")

    def __post_init__(self):
        if self.markov is None:
            self.markov = MarkovConfig()
        if self.sudoku is None:
            self.sudoku = SudokuConfig()
        if self.addition is None:
            self.addition = AdditionConfig()


@dataclasses.dataclass
class TrainConfig:
    steps: int = _field(1000, "Optimizer steps.")
    batch_size: int = _field(32, "Global batch size (rows of seq_len tokens).")
    grad_accum: int = _field(1, "Gradient accumulation: the batch runs as this many micro-batches of batch_size / grad_accum rows, one after another, and their mean gradient makes one update, equal to the whole batch's.")
    lr: float = _field(3e-3, "Peak learning rate.")
    warmup_steps: int = _field(50, "Linear warmup steps.")
    min_lr_ratio: float = _field(0.1, "Cosine decay ends at lr * min_lr_ratio.")
    weight_decay: float = _field(0.01, "AdamW weight decay of the matrices (not of norm scales or the token embedding: dlm.train.state.decays).")
    b1: float = _field(0.9, "Adam beta1.")
    b2: float = _field(0.99, "Adam beta2.")
    grad_clip: float = _field(1.0, "Global gradient-norm clip (0 disables).")
    ema_decay: float = _field(0.999, "EMA decay (with warm-up min(decay, (1+n)/(10+n))); 0 disables EMA.")
    seed: int = _field(0, "Seed of parameters, data order and diffusion noise.")
    log_every: int = _field(10, "Steps between metric records.")
    eval_every: int = _field(500, "Steps between validation NELBO evaluations (0 = only at the end).")
    eval_windows: int = _field(256, "Validation windows per evaluation.")
    eval_t_samples: int = _field(4, "Stratified time draws per validation window.")
    eval_use_ema: bool = _field(True, "Evaluate the EMA parameters (what sampling uses).")
    checkpoint_every: int = _field(500, "Steps between checkpoints (a checkpoint is also written at the end).")
    keep_checkpoints: int = _field(3, "Checkpoints kept.")
    async_checkpointing: bool = _field(True, "Write checkpoints in the background.")
    progress: bool = _field(True, "Show a tqdm progress bar.")
    nonfinite: NonFinitePolicy = _field(NonFinitePolicy.SKIP, "Non-finite loss or gradient: skip the update and count it, or stop with an error (the last good checkpoint stays).")
    inject_nonfinite_at: list = _field([], "Fault injection for testing: steps whose loss is made NaN.")
    init_from: str = _field("", "Parameters a run without checkpoints starts from (fine-tuning): a parameter checkpoint folder written by dlm.convert, or the workdir of another run (a model trained here, or dlm.convert's workdir: its newest checkpoint's EMA parameters when it keeps an EMA and evaluates with it, else its parameters), relative to this run's workdir or absolute; the optimizer starts fresh.")
    max_seconds: float = _field(0.0, "Wall-clock budget of this invocation in seconds (0: none): after the step that reaches it the run checkpoints and stops, as on a preemption; running again continues.")
    mode: TrainMode = _field(TrainMode.SFT, "sft: the diffusion objective on data. rl: policy-gradient post-training on a task's rewards (the rl section; starts from train.init_from).")


@dataclasses.dataclass
class RLConfig:
    group_size: int = _field(8, "G: rollouts per prompt; train.batch_size counts rollouts, so a step has batch_size / G prompts.")
    estimator: Estimator = _field(Estimator.ELBO, "How log pi(response | prompt) is estimated (dlm.rl.estimators): elbo (the objective's bound, t_samples times; an unbiased estimate of a lower bound), d1 (one pass with the response masked and the prompt masked at mask_prompt: biased), coupled (complementary mask pairs: antithetic, unbiased for the bound over the full time range), sandwich (SPG: the bound for positive advantages, a mixture with an upper bound for negative ones), trace (TraceRL: the probabilities of the tokens each pass of the parallel decoder committed, in the context it committed them, t_samples passes per rollout: the rollout policy's own log-probability of its tokens).")
    t_samples: int = _field(2, "elbo: stratified times per rollout; coupled and sandwich: complementary mask pairs per rollout; trace: decoding passes rescored per rollout (stratified over its passes).")
    mask_prompt: float = _field(0.15, "d1: each prompt token is masked with this probability (a fresh mask every inner step).")
    coupled_range: list = _field([0.0, 1.0], "coupled: the masking fraction t of a pair's first mask is drawn in [lo, hi] (the second masks the rest); [0, 1] is unbiased for the bound, DiffuCoder uses [0.2, 0.8].")
    sandwich_beta: float = _field(1.0, "sandwich: beta >= 1 of the upper bound (SPG uses 1.0 for Sudoku, 1.5 otherwise).")
    sandwich_mix: float = _field(0.5, "sandwich: the weight of the upper bound in the negatives' estimate (the rest is the lower bound).")
    clip: float = _field(0.2, "epsilon of the clipped importance ratio (length-normalised, sequence level).")
    kl: float = _field(0.04, "beta: weight of the KL penalty to the frozen starting model (the k3 estimate per rollout; 0: no reference copy is kept).")
    inner_steps: int = _field(1, "mu: optimizer updates per batch of rollouts, each with fresh estimator draws (the ratio is 1 at the first).")
    reward: Reward = _field(Reward.EXACT, "exact: 1 for a solved problem, else 0. cells: the share of response cells (Sudoku) or digits (addition) that are right: denser.")
    scale_rewards: bool = _field(False, "Divide each group's advantages by its reward standard deviation (GRPO); off: the group mean is subtracted only (Dr. GRPO, d1).")
    givens: list = _field([30, 0], "Sudoku: the prompts' givens, one pool of puzzles per entry (0: minimal puzzles), drawn with equal probability.")
    pool: int = _field(1000, "Sudoku: puzzles generated per pool (cached, from seeds of their own); each prompt is a random symmetry of one.")
    long_carry: float = _field(0.5, "Addition: the share of prompts whose carry ripples through at least digits - 1 columns (the rest uniform).")


@dataclasses.dataclass
class MeshConfig:
    data: int = _field(-1, "Data-parallel axis size (-1 = the devices left over).")
    fsdp: int = _field(1, "Fully-sharded data-parallel axis size.")
    tensor: int = _field(1, "Tensor-parallel axis size.")
    expert: int = _field(1, "Expert-parallel axis size: a mixture-of-experts layer's experts are split over it (tokens reach "
                            "them by all-to-all) and every other computation splits its batch over it, like data.")


@dataclasses.dataclass
class DecodeConfig:
    block_length: int = _field(32, "Semi-autoregressive block length (at most the generation length; when it does not divide it, the last block is aligned to the end).")
    score: Score = _field(Score.CONFIDENCE, "Rank masked positions by confidence p(x_hat) (the drawn token's probability: LLaDA's and Fast-dLLM's rule), top1 p1 (the top probability: the order ignores the draw), margin p1 - p2, or entropy (exp(-H)).")
    rule: CommitRule = _field(CommitRule.THRESHOLD, "topk (k per step, LLaDA), threshold (score > tau, at least the best: Fast-dLLM) or factor.")
    k: int = _field(1, "Tokens per step of the topk rule.")
    tau: float = _field(0.9, "Threshold of the threshold rule, in (0, 1] (1 = one token per step).")
    commit_temperature: float = _field(0.0, "kappa > 0 makes the threshold rule stochastic (RL rollouts whose commit decisions the trace estimator scores): each masked position commits with probability sigmoid((score - tau) / kappa), and the best one when none does; needs a score of the distribution alone (top1, margin or entropy). 0: the deterministic rule.")
    factor: float = _field(1.0, "f of the factor rule: commit the longest prefix with c_j >= 1 - f / (j + 1).")
    credit: bool = _field(False, "Trace-credit decoding (CreditDecoding).")
    credit_alpha: float = _field(0.7, "Credit fusion weight: logits + alpha * log(1 + credit).")
    credit_beta: float = _field(0.8, "Credit decay per step, in [0, 1).")
    credit_gamma: float = _field(0.2, "Credit boost exponent: credit[top1] += p_top1 ** gamma.")
    suffix_dropout: bool = _field(False, "DPad: attend only to suffix positions within `window` after the block, kept with a distance-decay probability.")
    window: int = _field(256, "DPad window W (>= 1).")
    k_sigma: float = _field(4.0, "DPad k: the window end sits at k standard deviations.")
    scale: float = _field(2.0, "DPad a: keep probability a * phi(k d / (W - 1)).")
    cache: DecodeCache = _field(DecodeCache.NONE, "KV cache: none, prefix (refreshed at each block start) or dual (prefix and suffix).")
    early_stop: bool = _field(True, "Stop a sample once a completed block holds EOS (the rest is filled with EOS).")


@dataclasses.dataclass
class SamplingConfig:
    steps: int = _field(128, "Steps of the time grid (per block for the block hyperschedule).")
    grid: TimeGrid = _field(TimeGrid.UNIFORM, "Time grid: uniform or cosine.")
    temperature: float = _field(1.0, "Softmax temperature (0 = argmax).")
    float64: bool = _field(True, "Draw float64-grade Gumbel noise (a 46-bit uniform built from two float32 words, or true "
                                 "float64 with sampling.x64); float32 noise lowers sample entropy.")
    x64: bool = _field(False, "Run the sampler under jax_enable_x64 (float64 noise and times): exact on CPU, emulated and slow on TPUs and most GPUs.")
    num_samples: int = _field(4, "Samples to draw.")
    length: int = _field(0, "Generated sequence length (0 = seq_len).")
    use_ema: bool = _field(True, "Sample with the EMA parameters.")
    seed: int = _field(0, "Sampling seed.")
    sampler: Sampler = _field(Sampler.ANCESTRAL, "ancestral (exact) or acs (Adaptive Correction Sampler: also resamples visible tokens).")
    eta: float = _field(0.01, "ACS correction strength: a visible generated token is resampled with probability eta * s / t.")
    cache: bool = _field(True, "Cache the keys/values of settled tokens (autoregressive, block and slide hyperschedules).")
    decode: DecodeConfig = _field(None, "Parallel decoding (sampler=parallel): blocks, score, commit rule, credit, suffix dropout, caches.")
    batch_buckets: list = _field([], "Batch sizes the compiled samplers are built for: a batch is padded with copies of its first row up to the smallest bucket that holds it (none: its own size), so batches of many sizes share a few programs; every real row gets the tokens it gets unpadded (random draws are indexed by row).")
    length_buckets: list = _field([], "Canvas lengths (prompt + generation) the samplers are built for: rows are left-padded (the padding hidden, positions counted from each row's first token) up to the smallest bucket that holds the canvas, so prompts of many lengths share one program per bucket and generation length; the tokens are those of the unpadded call at any temperature (every loop keys its draws by position past the padding). For a block hyperschedule the padding must be whole blocks (buckets that are multiples of diffusion.block_width).")

    def __post_init__(self):
        if self.decode is None:
            self.decode = DecodeConfig()


@dataclasses.dataclass
class Config:
    workdir: str = _field("runs/default", "Directory for the resolved config, checkpoints, metrics and samples.")
    model: ModelConfig = _field(None, "Denoiser architecture.")
    diffusion: DiffusionConfig = _field(None, "Noise schedule, process and objective.")
    data: DataConfig = _field(None, "Data source, tokenizer and packing.")
    train: TrainConfig = _field(None, "Optimisation, evaluation and checkpointing.")
    mesh: MeshConfig = _field(None, "Device mesh (data, expert, fsdp, tensor).")
    sampling: SamplingConfig = _field(None, "Sampler defaults (with train.mode=rl: the rollouts' decoder).")
    rl: RLConfig = _field(None, "Post-training from rewards (train.mode=rl).")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, typing.get_type_hints(Config)[f.name]())


def check_moe(m: "ModelConfig") -> None:
    e = m.moe
    if e.experts < 0 or (e.experts and not 1 <= e.top_k <= e.experts):
        raise ConfigError(f"model.moe.experts={e.experts} must be at least 0 and model.moe.top_k={e.top_k} in [1, experts].")
    if not e.experts:
        return
    if m.mlp != "swiglu" or m.block != "prenorm":
        raise ConfigError("model.moe.experts > 0 needs model.mlp=swiglu and model.block=prenorm (the experts are SwiGLUs).")
    if e.expert_dim < 0 or e.shared_experts < 0 or not 0 <= e.dense_layers < m.num_layers:
        raise ConfigError(f"model.moe.expert_dim={e.expert_dim} and model.moe.shared_experts={e.shared_experts} must be at least 0, "
                          f"and model.moe.dense_layers={e.dense_layers} in [0, model.num_layers={m.num_layers}).")
    if e.router not in ("softmax", "sigmoid"):
        raise ConfigError(f"model.moe.router={e.router!r} is not one of softmax, sigmoid.")
    if e.groups < 1 or e.experts % e.groups or not 1 <= e.group_top_k <= e.groups or \
            (e.groups > 1 and (e.router != "sigmoid" or e.top_k > e.group_top_k * (e.experts // e.groups))):
        raise ConfigError(f"model.moe.groups={e.groups} must divide model.moe.experts={e.experts} and model.moe.group_top_k="
                          f"{e.group_top_k} lie in [1, groups], with room for top_k={e.top_k} experts (groups need router=sigmoid).")
    if e.expert_bias and e.router != "sigmoid":
        raise ConfigError("model.moe.expert_bias needs model.moe.router=sigmoid (it biases the choice among sigmoid scores).")
    if not e.route_scale > 0:
        raise ConfigError(f"model.moe.route_scale={e.route_scale} must be above 0.")
    if e.impl not in ("tiles", "ragged"):
        raise ConfigError(f"model.moe.impl={e.impl!r} is not one of tiles, ragged.")
    if e.capacity_factor < 0 or e.load_balance < 0 or e.router_z < 0:
        raise ConfigError("model.moe.capacity_factor, model.moe.load_balance and model.moe.router_z must be at least 0.")


def check_buckets(sc: "SamplingConfig") -> None:
    """Buckets are lists of increasing positive integers."""
    for name in ("batch_buckets", "length_buckets"):
        b = getattr(sc, name)
        ok = isinstance(b, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b)
        if not ok or any(x >= y for x, y in zip(b, b[1:])):
            raise ConfigError(f"sampling.{name}={b!r} must be a list of increasing positive integers, e.g. [1, 8, 32].")


def check_sampling_overrides(overrides, command: str) -> None:
    """`command` takes sampling.* overrides only (the trained model is fixed): one sentence otherwise."""
    bad = [o for o in overrides if not o.startswith("sampling.")]
    if bad:
        raise ConfigError(f"{command} takes sampling.* overrides only; {bad[0]!r} changes the trained model: train again instead.")


def check_decode(dc: "DecodeConfig", length: int | None = None) -> None:
    """One-sentence errors for a parallel-decoding config (and a generation length, when known)."""
    if dc.block_length < 1:
        raise ConfigError(f"sampling.decode.block_length={dc.block_length} must be at least 1.")
    if length is not None and dc.block_length > length:
        raise ConfigError(f"sampling.decode.block_length={dc.block_length} is longer than the generation length {length}; "
                          "use a block length at most that.")
    if not 0.0 < dc.tau <= 1.0:
        raise ConfigError(f"sampling.decode.tau={dc.tau} must be in (0, 1].")
    if not 0.0 <= dc.commit_temperature < math.inf:
        raise ConfigError(f"sampling.decode.commit_temperature={dc.commit_temperature} must be >= 0 and finite (0: the deterministic rule).")
    if dc.commit_temperature > 0 and (dc.rule != CommitRule.THRESHOLD or dc.score == Score.CONFIDENCE):
        raise ConfigError(f"sampling.decode.commit_temperature={dc.commit_temperature} makes the threshold rule stochastic and needs "
                          f"rule=threshold with score top1, margin or entropy (got rule={CommitRule(dc.rule).value}, score={Score(dc.score).value}), "
                          "so that the commit probability is a function of the model's distribution alone.")
    if dc.window < 1:
        raise ConfigError(f"sampling.decode.window={dc.window} must be at least 1 (W, the suffix positions that may be kept).")
    if dc.k < 1:
        raise ConfigError(f"sampling.decode.k={dc.k} must be at least 1.")
    if not 0.0 <= dc.credit_beta < 1.0:
        raise ConfigError(f"sampling.decode.credit_beta={dc.credit_beta} must be in [0, 1).")
    if not all(0 < v < math.inf for v in (dc.factor, dc.k_sigma, dc.scale)):
        raise ConfigError("sampling.decode.factor, k_sigma and scale must be positive and finite.")
    if not (0 <= dc.credit_alpha < math.inf and math.isfinite(dc.credit_gamma)):
        raise ConfigError("sampling.decode.credit_alpha must be >= 0 and finite, and credit_gamma finite.")
    if dc.k > 1 << 20 or dc.window > 1 << 20:
        raise ConfigError(f"sampling.decode.k={dc.k} and window={dc.window} must be at most {1 << 20} (a block or a context, not more).")


# ---------------------------------------------------------------------------- parsing


def _type_name(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            choices = [m.value for m in tp]
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}={value!r} is not a valid choice; use one of {', '.join(choices)}.{hint}") from None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is list and isinstance(value, list):
        return value
    if tp is list and isinstance(value, str):
        return [value]
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}.")


def _apply(obj, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys are {', '.join(prefix + n for n in names)}."
            raise ConfigError(f"Unknown config key {key!r}{hint}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give it as a mapping of keys, not {v!r}.")
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _coerce(v, tp, key))


def _read_yaml(path: pathlib.Path, seen=()) -> dict:
    if not path.exists():
        raise ConfigError(f"Config file {str(path)!r} does not exist; pass an existing YAML file to --config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys.")
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"Config file {str(path)!r} extends itself through {str(base_path)!r}.")
    return _merge(_read_yaml(base_path, seen + (base_path,)), data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(cfg: "Config", overrides: list[str]) -> "Config":
    """`cfg` with dotted overrides (``diffusion.block_width=32``) applied in place (not validated)."""
    _apply(cfg, _fix_scientific(parse_overrides(list(overrides))))
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """['model.num_layers=2', 'train.lr=1e-3'] -> nested dict of YAML-parsed values."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value, e.g. model.num_layers=2.")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r} sets a key under {p!r}, which is not a section.")
        node[parts[-1]] = value
    return nested


def _fix_scientific(d):
    """YAML 1.1 (PyYAML) reads '3e-3' as a string; turn such strings back into floats."""
    if isinstance(d, dict):
        return {k: _fix_scientific(v) for k, v in d.items()}
    if isinstance(d, str):
        try:
            if "e" in d.lower() and not d.isalpha():
                return float(d)
        except ValueError:
            pass
    return d


def validate(cfg: Config) -> Config:
    """Cross-field checks; each failure is one sentence naming the key."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}.")
    for name, allowed in (("norm", ("rms", "layer")), ("mlp", ("swiglu", "gelu")), ("block", ("prenorm", "dit"))):
        if getattr(m, name) not in allowed:
            raise ConfigError(f"model.{name}={getattr(m, name)!r} is not one of {', '.join(allowed)}.")
    if m.block == "dit" and m.noise_conditioning:
        raise ConfigError("model.block=dit conditions on sigma = 0 (MDLM-OWT); set model.noise_conditioning=false.")
    if m.mask_id >= 0 and not m.vocab_size:
        raise ConfigError(f"model.mask_id={m.mask_id} needs model.vocab_size (the logit columns it lies inside).")
    if m.mask_id >= 0 and m.mask_id > m.vocab_size:
        raise ConfigError(f"model.mask_id={m.mask_id} lies beyond model.vocab_size={m.vocab_size}; use an id inside the vocabulary or -1.")
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}.")
    check_moe(m)
    if m.moe.experts and cfg.mesh.expert > 1 and m.moe.experts % cfg.mesh.expert:
        raise ConfigError(f"model.moe.experts={m.moe.experts} must be divisible by mesh.expert={cfg.mesh.expert} (each device holds "
                          "experts / mesh.expert of them).")
    if (m.d_model // m.num_heads) % 2:
        raise ConfigError(f"model.d_model / model.num_heads = {m.d_model // m.num_heads} must be even for RoPE.")
    rotary = round(m.rope_fraction * (m.d_model // m.num_heads))
    if not 0 < m.rope_fraction <= 1 or rotary % 2 or abs(rotary - m.rope_fraction * (m.d_model // m.num_heads)) > 1e-6:
        raise ConfigError(f"model.rope_fraction={m.rope_fraction} must be in (0, 1] and rotate an even number of the "
                          f"{m.d_model // m.num_heads} dimensions of a head.")
    for key, val in [("model.num_layers", m.num_layers), ("data.seq_len", d.seq_len), ("train.batch_size", t.batch_size),
                     ("train.steps", t.steps), ("sampling.steps", cfg.sampling.steps), ("diffusion.num_steps", cfg.diffusion.num_steps)]:
        if val < 1:
            raise ConfigError(f"{key}={val} must be at least 1.")
    if m.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={m.attention!r} is not valid; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}.")
    if m.attention_chunk < 1:
        raise ConfigError(f"model.attention_chunk={m.attention_chunk} must be at least 1.")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1).")
    if cfg.sampling.temperature < 0:
        raise ConfigError(f"sampling.temperature={cfg.sampling.temperature} must be >= 0.")
    check_buckets(cfg.sampling)
    if d.source == Source.FILES and not d.paths:
        raise ConfigError("data.source=files needs data.paths, a list of local text or JSONL files.")
    if d.source == Source.HF and not d.hf_name:
        raise ConfigError("data.source=hf needs data.hf_name, e.g. data.hf_name=wikitext.")
    if d.source == Source.TFDS and not d.tfds_name:
        raise ConfigError("data.source=tfds needs data.tfds_name, e.g. data.tfds_name=lm1b.")
    if d.source == Source.SHARDS and not d.path:
        raise ConfigError("data.source=shards needs data.path, the directory written by python -m dlm.data.prepare --out DIR.")
    if d.loader_threads < 1 or d.prefetch < 1 or d.loader_workers < 0:
        raise ConfigError("data.loader_threads and data.prefetch must be at least 1, and data.loader_workers at least 0.")
    if d.loader_workers and d.source != Source.SHARDS:
        raise ConfigError(f"data.loader_workers={d.loader_workers} needs data.source=shards; the {d.source.value} source is read in the "
                          "training process: leave data.loader_workers at 0.")
    if d.tokenizer == TokenizerKind.PRETRAINED and not d.pretrained_tokenizer:
        raise ConfigError("data.tokenizer=pretrained needs data.pretrained_tokenizer, e.g. gpt2.")
    mk = d.markov
    if mk.structure == MarkovStructure.CYCLE and not (0 <= mk.branches <= mk.num_states and 0 < mk.noise < 1):
        raise ConfigError(f"data.markov.branches={mk.branches} must be in [0, num_states={mk.num_states}] and "
                          f"data.markov.noise={mk.noise} in (0, 1) (the noise keeps every transition possible).")
    pairs = d.format == DataFormat.PAIRS
    if d.source == Source.SUDOKU:
        n = d.sudoku.size
        if n not in (4, 6, 9):
            raise ConfigError(f"data.sudoku.size={n} is not supported; use 4, 6 or 9.")
        if d.seq_len != n * n * (2 if pairs else 1):
            raise ConfigError(f"data.source=sudoku with data.sudoku.size={n} and data.format={d.format.value} needs data.seq_len="
                              f"{n * n * (2 if pairs else 1)} ({'the puzzle, then the solution' if pairs else 'one token per cell'}).")
        if d.sudoku.base_grids < 1 or d.sudoku.validation < 1:
            raise ConfigError("data.sudoku.base_grids and data.sudoku.validation must be at least 1.")
    if d.source == Source.ADDITION:
        a = d.addition
        if a.digits < 1 or a.validation < 1:
            raise ConfigError("data.addition.digits and data.addition.validation must be at least 1.")
        if d.seq_len != 3 * (a.digits + 1):
            raise ConfigError(f"data.source=addition with data.addition.digits={a.digits} needs data.seq_len={3 * (a.digits + 1)} "
                              "(three rows of digits + 1 digits: the operands, then the sum).")
    if pairs and d.source not in (Source.FILES, Source.HF, Source.SUDOKU, Source.ADDITION):  # shards hold packed streams
        raise ConfigError(f"data.format=pairs needs a source of prompt/response records (files, hf, sudoku or addition), not {d.source.value}.")
    if pairs and cfg.diffusion.process != Process.ABSORBING:
        raise ConfigError(f"data.format=pairs is not supported with diffusion.process={cfg.diffusion.process.value} (it corrupts every "
                          "position, the prompt included); use the absorbing process.")
    if m.grid and (len(m.grid) not in (4, 5) or any(not isinstance(v, int) or v < 1 for v in m.grid)
                   or m.grid[0] % m.grid[2] or m.grid[1] % m.grid[3] or m.grid[0] * m.grid[1] * (m.grid[4] if len(m.grid) == 5 else 1) < d.seq_len):
        raise ConfigError(f"model.grid={m.grid} must be [rows, cols, box_rows, box_cols] (or with pages last) with box_rows dividing rows, "
                          f"box_cols dividing cols and rows * cols * pages >= data.seq_len={d.seq_len}.")
    if m.learned_positions < 0 or (m.learned_positions and m.learned_positions < d.seq_len):
        raise ConfigError(f"model.learned_positions={m.learned_positions} must be 0 or at least data.seq_len={d.seq_len}.")
    if d.source in (Source.MARKOV, Source.SUDOKU, Source.ADDITION) and d.tokenizer != TokenizerKind.BYTE:
        raise ConfigError(f"data.source={d.source.value} has its own alphabet; leave data.tokenizer at byte.")
    hk = cfg.diffusion.hyperschedule
    if hk in (HyperscheduleKind.BLOCK, HyperscheduleKind.SLIDE, HyperscheduleKind.BLOCK_SLIDE) and (cfg.diffusion.block_width < 1 or d.seq_len % cfg.diffusion.block_width):
        raise ConfigError(f"diffusion.block_width={cfg.diffusion.block_width} must divide data.seq_len={d.seq_len}.")
    if hk != HyperscheduleKind.FLAT and cfg.diffusion.prime.l > 1:
        raise ConfigError(f"diffusion.hyperschedule={hk.value} with diffusion.prime.l={cfg.diffusion.prime.l} is not supported; "
                          "use the flat hyperschedule for Prime models.")
    dc = cfg.diffusion
    if dc.layout == Layout.DOUBLE and hk in (HyperscheduleKind.SLIDE, HyperscheduleKind.BLOCK_SLIDE):
        raise ConfigError(f"diffusion.layout=double with diffusion.hyperschedule={hk.value} is not supported; use layout=single.")
    if dc.block_steps < 1:
        raise ConfigError(f"diffusion.block_steps={dc.block_steps} must be at least 1.")
    if not 0.0 <= dc.epsilon < 1.0:
        raise ConfigError(f"diffusion.epsilon={dc.epsilon} must be in [0, 1) (the probability of a uniform replacement).")
    if not 0.0 <= dc.gamma < 1.0:
        raise ConfigError(f"diffusion.gamma={dc.gamma} must be in [0, 1) (the uniform share of the rate matrix).")
    if dc.process == Process.GAMMA_HYBRID:
        if not (dc.schedule == Schedule.LOGLINEAR and 0 < dc.loglinear_eps < 1):  # the only family with alpha(1) > 0
            raise ConfigError(f"diffusion.process=gamma_hybrid needs alpha(1) > 0 (a finite total noise); diffusion.schedule="
                              f"{dc.schedule.value} with loglinear_eps={dc.loglinear_eps} does not have it: use "
                              "diffusion.schedule=loglinear with diffusion.loglinear_eps in (0, 1).")
        if not m.noise_conditioning:
            raise ConfigError("diffusion.process=gamma_hybrid needs per-token noise conditioning: set model.noise_conditioning=true.")
        if dc.time != TimeMode.CONTINUOUS:
            raise ConfigError("diffusion.process=gamma_hybrid has a continuous-time bound only: set diffusion.time=continuous.")
    if dc.process != Process.ABSORBING and (hk != HyperscheduleKind.FLAT or dc.prime.l > 1):
        raise ConfigError(f"diffusion.process={dc.process.value} with diffusion.hyperschedule={hk.value} and diffusion.prime.l={dc.prime.l} "
                          "is not supported; hybrid processes use the flat hyperschedule and l = 1.")
    check_decode(cfg.sampling.decode)
    if cfg.sampling.eta < 0:
        raise ConfigError(f"sampling.eta={cfg.sampling.eta} must be >= 0.")
    if cfg.diffusion.prime.l < 1:
        raise ConfigError(f"diffusion.prime.l={cfg.diffusion.prime.l} must be at least 1.")
    if m.d_model % cfg.diffusion.prime.l:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by diffusion.prime.l={cfg.diffusion.prime.l} "
                          "(the l sub-token embeddings are concatenated into one token embedding).")
    if cfg.sampling.length > d.seq_len:
        raise ConfigError(f"sampling.length={cfg.sampling.length} exceeds the model context data.seq_len={d.seq_len}.")
    if t.max_seconds < 0:
        raise ConfigError(f"train.max_seconds={t.max_seconds} must be >= 0 (0: no budget).")
    if t.mode == TrainMode.RL:
        check_rl(cfg)
    return cfg


def check_rl(cfg: Config) -> None:
    """The cross-field checks of train.mode=rl, one sentence each."""
    r, t = cfg.rl, cfg.train
    if cfg.data.source not in (Source.SUDOKU, Source.ADDITION):
        raise ConfigError(f"train.mode=rl needs a task with a checker (data.source=sudoku or addition), not {cfg.data.source.value}.")
    if not t.init_from:
        raise ConfigError("train.mode=rl starts from a trained model: set train.init_from to its workdir (a run trained here or "
                          "written by dlm.convert).")
    if r.group_size < 2 or t.batch_size % r.group_size:
        raise ConfigError(f"rl.group_size={r.group_size} must be at least 2 and divide train.batch_size={t.batch_size} (rollouts per step).")
    if cfg.sampling.temperature <= 0:
        raise ConfigError(f"train.mode=rl draws its rollouts from the policy: sampling.temperature={cfg.sampling.temperature} must be > 0.")
    if t.grad_accum != 1:
        raise ConfigError("train.mode=rl runs each update in one pass; leave train.grad_accum at 1.")
    if r.t_samples < 1 or r.inner_steps < 1:
        raise ConfigError(f"rl.t_samples={r.t_samples} and rl.inner_steps={r.inner_steps} must be at least 1.")
    if r.estimator == Estimator.TRACE and cfg.sampling.sampler != Sampler.PARALLEL:
        raise ConfigError("rl.estimator=trace scores the decoding trace of the parallel decoder: set sampling.sampler=parallel.")
    if not 0.0 <= r.mask_prompt < 1.0:
        raise ConfigError(f"rl.mask_prompt={r.mask_prompt} must be in [0, 1).")
    lo_hi = r.coupled_range
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0 or abs(lo_hi[0] + lo_hi[1] - 1.0) > 1e-9:
        raise ConfigError(f"rl.coupled_range={lo_hi} must be [lo, hi] with 0 <= lo < hi <= 1 and lo + hi = 1 (a pair's masks "
                          "are complementary, so their fractions t and 1 - t share the range).")
    if r.sandwich_beta < 1.0 or not 0.0 <= r.sandwich_mix <= 1.0:
        raise ConfigError(f"rl.sandwich_beta={r.sandwich_beta} must be >= 1 and rl.sandwich_mix={r.sandwich_mix} in [0, 1].")
    if r.clip <= 0 or r.kl < 0:
        raise ConfigError(f"rl.clip={r.clip} must be > 0 and rl.kl={r.kl} >= 0.")
    if cfg.data.source == Source.SUDOKU and (not r.givens or any(not isinstance(g, int) or not 0 <= g < cfg.data.sudoku.size ** 2
                                                                 for g in r.givens) or r.pool < 1):
        raise ConfigError(f"rl.givens={r.givens} must list givens counts in [0, {cfg.data.sudoku.size ** 2}) (0: minimal puzzles) "
                          f"and rl.pool={r.pool} be at least 1.")
    if not 0.0 <= r.long_carry <= 1.0:
        raise ConfigError(f"rl.long_carry={r.long_carry} must be in [0, 1].")


def from_dict(values: dict) -> Config:
    cfg = Config()
    _apply(cfg, _fix_scientific(values))
    return validate(cfg)


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML config (following `extends:`), apply dotted overrides, validate."""
    values = _read_yaml(pathlib.Path(path).resolve()) if path else {}
    return from_dict(_merge(values, parse_overrides(list(overrides))))


def to_dict(cfg) -> dict:
    def conv(v):
        if isinstance(v, enum.Enum):
            return v.value
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return v

    return conv(cfg)


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
