"""The serving engine: requests of different prompt lengths, generation lengths and decoder
settings decoded together by the parallel decoder, one block of every running request per step
(continuous batching).

Between steps a request's state lives on the host: its canvas (prompt, then masks, then unused
columns up to its length bucket), its prompt length P, its own length P + G, the index of its
next block, whether it has finished, and its random key. A step takes the requests of one
*group* (the same compiled settings: dlm.sampling.parallel's static decoder settings and whether
it samples or takes the argmax), up to the largest batch bucket, running ones first then the
oldest waiting, pads them to a batch bucket and to the longest of their length buckets, and
decodes one block of each. A request whose block
held EOS (early stop) or whose last block is done leaves the batch; a waiting one takes its place
at the next step. So rows join and leave at block boundaries, as the cache is rebuilt at each
block start anyway.

Each row is decoded as it is decoded alone: the step vmaps dlm.sampling.parallel.decode_block
over rows of batch one, each with its own block start, its own length (keys past it are hidden),
its own threshold and temperature, and its own key split per block as generate() splits it. So a
request's tokens are those of generate(model, prompts=[prompt], length=P + G) with its settings
and seed, greedy or not (up to float rounding of the longer, masked canvas).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlm.config import CommitRule, ConfigError, DecodeConfig, check_decode
from dlm.mesh import BATCH, batch_shards, batch_sharding, mesh_context
from dlm.sampling.parallel import decode_block, suffix_slot_count

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass
class Request:
    """One generation: the prompt's ids, the tokens to generate, its decoder settings (the
    parallel decoder's DecodeConfig, temperature, seed). `on_block(tokens)` is called from the
    engine's thread with the generated tokens so far after every block (cut at EOS once the row
    has finished); `tokens` (the generated tokens, EOS and its fill included) and `finish_reason`
    ('stop': EOS, 'length', 'cancelled', or an error sentence) are set when it is done, and then
    `on_done(request)` is called (from the engine's thread)."""

    prompt: np.ndarray
    max_tokens: int
    decode: DecodeConfig
    temperature: float = 0.0
    seed: int = 0
    on_block: Callable | None = None
    on_done: Callable | None = None
    id: int = 0
    submitted: float = 0.0
    # state
    tokens: np.ndarray | None = None
    finish_reason: str | None = None
    blocks: int = 0  # blocks decoded
    passes: int = 0  # forward passes its row needed
    cancelled: bool = False
    _done: threading.Event = dataclasses.field(default_factory=threading.Event)
    _state: dict | None = None
    _joined: bool = False  # holds a row (has decoded a block)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Free this request's row at the next block boundary (a client that went away)."""
        self.cancelled = True


def _static(dc: DecodeConfig) -> DecodeConfig:
    """The settings that make a program: the threshold is traced per row, and fields the rule,
    the credit and the suffix dropout do not read are reset, so that requests differing only in
    them share one program."""
    d = DecodeConfig()
    dc = dataclasses.replace(dc, tau=d.tau, early_stop=dc.early_stop)
    if dc.rule != CommitRule.TOPK:
        dc = dataclasses.replace(dc, k=d.k)
    if dc.rule != CommitRule.FACTOR:
        dc = dataclasses.replace(dc, factor=d.factor)
    if not dc.credit:
        dc = dataclasses.replace(dc, credit_alpha=d.credit_alpha, credit_beta=d.credit_beta, credit_gamma=d.credit_gamma)
    if not dc.suffix_dropout:
        dc = dataclasses.replace(dc, window=d.window, k_sigma=d.k_sigma, scale=d.scale)
    return dc


MAX_PROGRAMS = 64  # compiled step programs kept (least recently used out)


class Engine:
    """Continuous batching over the parallel decoder.

    model: a Transformer (sharded or not); `eos_id` ends a row early (decode.early_stop);
    `length_buckets`: the canvas lengths rows are decoded in (a request of P + G tokens goes to
    the smallest that holds it; none longer than `max_length`); `batch_buckets`: the batch sizes
    a step is padded to, the largest being how many requests run together; `mesh` shards the
    batch over (data, expert, fsdp) as generate() does (batch buckets are then rounded up to a multiple
    of its data x expert x fsdp devices).

    Use it directly (submit() then run() or step() in a loop), through generate() for a list of
    prompts, or from a background thread (start(), as the HTTP server does)."""

    def __init__(self, model, *, eos_id: int = -1, length_buckets=(64, 128, 256, 512, 1024, 2048, 4096),
                 batch_buckets=DEFAULT_BATCHES, max_length: int | None = None, mesh=None, float64: bool = True,
                 diffusion=None):
        if diffusion is not None:
            from dlm.objectives import SamplerFamily, objective_for

            if objective_for(diffusion, model.mask_id, model.cfg.noise_conditioning, model.vocab_size).sampler != SamplerFamily.TOKENS:
                raise ConfigError("The serving engine decodes flat absorbing models (MDLM, LLaDA, Dream) with the parallel decoder; "
                                  "this run's hyperschedule, process or Prime setting needs dlm.generate with its own sampler.")
        self.model, self.eos_id, self.mesh, self.float64 = model, eos_id, mesh, float64
        self.mask_id, self.vocab_size = model.mask_id, model.vocab_size
        self.max_length = max_length or max(length_buckets)
        self.length_buckets = sorted({b for b in length_buckets if b < self.max_length} | {self.max_length})
        shards = 1 if mesh is None else batch_shards(mesh)
        self.batch_buckets = sorted({-(-b // shards) * shards for b in batch_buckets})
        self.graphdef, params = nnx.split(model)
        self.leaves, self.treedef = jax.tree.flatten(params)
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self.compilations = 0
        self._lock = threading.Condition()
        self._queue: collections.OrderedDict = collections.OrderedDict()  # id -> Request, oldest first
        self._ids = itertools.count(1)
        self._thread = None
        self._stop = False
        self.stats = collections.Counter()

    # ------------------------------------------------------------------ requests

    def submit(self, prompt, max_tokens: int, *, decode: DecodeConfig | None = None, temperature: float = 0.0,
               seed: int = 0, on_block: Callable | None = None, on_done: Callable | None = None) -> Request:
        """Queue a generation of `max_tokens` after `prompt` (ids). Bad settings raise ConfigError
        (one sentence) here, before anything is queued."""
        dc = decode or DecodeConfig()
        p = np.asarray(prompt, np.int64).reshape(-1)
        if len(p) == 0:
            raise ConfigError("The prompt is empty; give at least one token.")
        bad = (p < 0) | (p >= self.vocab_size) | (p == self.mask_id)
        if bad.any():
            raise ConfigError(f"The prompt holds token {int(p[bad][0])}, not a token of the vocabulary [0, {self.vocab_size}) "
                              f"other than the mask {self.mask_id}.")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens!r} must be a positive integer.")
        if len(p) + max_tokens > self.max_length:
            raise ConfigError(f"The prompt ({len(p)} tokens) and max_tokens={max_tokens} make {len(p) + max_tokens} tokens, "
                              f"more than this model's context of {self.max_length}; shorten one of them.")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
            raise ConfigError(f"temperature={temperature!r} must be a number >= 0 (0 decodes by argmax).")
        if not (isinstance(seed, int) and -2**63 <= seed < 2**63):
            raise ConfigError(f"seed={seed!r} must be an integer in [-2**63, 2**63).")
        if dc.block_length > max_tokens:
            dc = dataclasses.replace(dc, block_length=max_tokens)  # a short generation is one block
        check_decode(dc, max_tokens)
        req = Request(p.astype(np.int32), max_tokens, dc, float(temperature), int(seed), on_block, on_done, next(self._ids),
                      time.time())
        req._state = self._initial_state(req, self.bucket(req))
        with self._lock:
            self._queue[req.id] = req
            self._lock.notify_all()
        self.stats["submitted"] += 1
        return req

    def generate(self, prompts, max_tokens, *, decode: DecodeConfig | None = None, temperature: float = 0.0,
                 seed: int = 0) -> list[np.ndarray]:
        """The generated tokens of every prompt (max_tokens: one for all, or one per prompt),
        decoded together; runs the engine in this thread unless it has its own."""
        counts = max_tokens if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(prompts)
        reqs = [self.submit(p, g, decode=decode, temperature=temperature, seed=seed) for p, g in zip(prompts, counts)]
        if self._thread is None:
            self.run()
        for r in reqs:
            r.wait()
        return [r.tokens for r in reqs]

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    # ------------------------------------------------------------------ the loop

    def length_bucket(self, n: int) -> int:
        """The canvas length a request of n tokens (prompt and generation) is decoded in."""
        return next(b for b in self.length_buckets if b >= n)

    def bucket(self, req: Request) -> int:
        return self.length_bucket(len(req.prompt) + req.max_tokens)

    def _group(self, req: Request):
        return (repr(_static(req.decode)), req.temperature > 0)

    def step(self) -> int:
        """Decode one block of the running requests of one group (the group of the oldest
        request); returns how many requests it advanced (0: nothing queued)."""
        with self._lock:
            for rid in [rid for rid, r in self._queue.items() if r.cancelled]:
                self._finish(self._queue.pop(rid), "cancelled")
            if not self._queue:
                return 0
            oldest = next(iter(self._queue.values()))
            group = self._group(oldest)
            cap = self.batch_buckets[-1]
            # running rows first (they hold their slots), then the waiting ones, oldest first
            members = [r for r in self._queue.values() if self._group(r) == group]
            members = sorted(members, key=lambda r: (not r._joined, r.id))[:cap]
        joined = sum(not r._joined for r in members)
        running = len(members) - joined
        if joined and running:
            self.stats["joined_running_batch"] += joined
        _, sampled = group
        dc = _static(oldest.decode)
        L = max(self.bucket(r) for r in members)  # the batch's canvas: its longest row's bucket
        for r in members:
            if not r._joined:  # the key is made here, not in submit(): a JAX call on the submitting thread (the
                # server's event loop) would wait for the step running on the device
                r._state["key"] = np.asarray(jax.random.key_data(jax.random.key(r.seed)))
            r._joined = True
        B = next(b for b in self.batch_buckets if b >= len(members))
        rows = members + [members[0]] * (B - len(members))
        arrays = {k: np.stack([r._state[k] for r in rows]) for k in members[0]._state if k != "x"}
        fill = max(self.eos_id, 0)  # columns past a row's own length: hidden from every pass
        arrays["x"] = np.stack([np.pad(r._state["x"], (0, L - len(r._state["x"])), constant_values=fill) for r in rows])
        arrays["done"][len(members):] = True  # padding rows take no steps
        try:
            program = self._program(dc, sampled, L, B)
            out = self._run(program, arrays, [r.temperature for r in rows], sampled)
        except Exception as e:  # this step's requests fail; the others go on
            with self._lock:
                for r in members:
                    self._queue.pop(r.id, None)
            for r in members:
                self._finish(r, f"error: {type(e).__name__}: {str(e)[:200]}")
            self.stats["failed_steps"] += 1
            return len(members)
        for i, r in enumerate(members):
            self._advance(r, {k: v[i] for k, v in out.items()})
        self.stats["steps"] += 1
        self.stats["rows"] += len(members)
        return len(members)

    def run(self) -> None:
        """Step until nothing is queued."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the loop in a background thread (until stop())."""
        if self._thread is not None:
            return
        self._stop = False

        def loop():
            while not self._stop:
                with self._lock:
                    while not self._queue and not self._stop:
                        self._lock.wait(0.5)
                if self._stop:
                    break
                self.step()  # a failing step finishes its own requests with the error

        self._thread = threading.Thread(target=loop, name="dlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:  # nothing is left waiting for a loop that no longer runs
            left = list(self._queue.values())
            self._queue.clear()
        for r in left:
            self._finish(r, "cancelled")

    # ------------------------------------------------------------------ rows

    def _initial_state(self, r: Request, L: int) -> dict:
        P = len(r.prompt)
        x = np.full(L, self.mask_id, np.int32)
        x[:P] = r.prompt
        x[P + r.max_tokens:] = max(self.eos_id, 0)  # unused columns: hidden from every pass
        return {"x": x, "P": np.int32(P), "valid": np.int32(P + r.max_tokens), "block": np.int32(0), "done": np.bool_(False),
                "key": None, "tau": np.float32(r.decode.tau)}

    def _advance(self, r: Request, out: dict) -> None:
        s = r._state
        s.update(x=out["x"][:len(s["x"])], done=out["done"], key=out["key"], block=s["block"] + 1)
        r.blocks += 1
        r.passes += int(out["passes"])
        P, G, Bk = int(s["P"]), r.max_tokens, r.decode.block_length
        blocks = -(-G // Bk)
        end = min(P + int(s["block"]) * Bk, P + G)
        gen = s["x"][P:end]
        if bool(s["done"]):
            stop = np.flatnonzero(gen == self.eos_id)
            gen = gen[: stop[0] + 1] if len(stop) else gen
        if r.on_block is not None and not r.cancelled:
            try:
                r.on_block(gen)
            except Exception:  # a consumer's failure (a closed stream) cancels its request only
                r.cancelled = True
        if bool(s["done"]) or int(s["block"]) >= blocks:
            r.tokens = s["x"][P:P + G].copy()
            with self._lock:
                self._queue.pop(r.id, None)
            self._finish(r, "stop" if bool(s["done"]) or (self.eos_id >= 0 and (r.tokens == self.eos_id).any()) else "length")

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r._state = None
        self.stats["finished_" + reason.split(":")[0]] += 1
        r._done.set()
        if r.on_done is not None:
            try:
                r.on_done(r)
            except Exception:  # a consumer that went away
                pass

    # ------------------------------------------------------------------ programs

    def _program(self, dc: DecodeConfig, sampled: bool, L: int, B: int):
        key = (repr(dc), sampled, L, B)
        if key in self._programs:
            self._programs.move_to_end(key)
            return self._programs[key]
        graphdef, treedef = self.graphdef, self.treedef
        mask_id, eos_id, V, float64 = self.mask_id, self.eos_id, self.vocab_size, self.float64
        m = self.model.cfg
        kv_dtype = jnp.dtype(m.dtype.value)
        S = suffix_slot_count(dc, L)
        cond = m.noise_conditioning

        def row(leaves, x, P, valid, block, done, key, tau, temperature):
            def model_fn(tokens, positions, attention, kv_cache, return_kv):
                # rebuilt where it is called, so that NNX sees Variables of the loop body's trace level
                module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
                t = jnp.where(tokens == mask_id, 1.0, 0.0) if cond else None
                return module(tokens, positions=positions, attention=attention, noise=t, kv_cache=kv_cache,
                              return_kv=return_kv, head=False)

            key = jax.random.wrap_key_data(key)
            key, k_blk = jax.random.split(key)
            start = jnp.minimum(P + block * dc.block_length, valid - dc.block_length)
            given = (jnp.arange(L) < P)[None]
            xb, db, it, rn, _, _ = decode_block(
                model_fn, x[None], start, given, done[None], k_blk, dc, sizes=[L], S=S, mask_id=mask_id, eos_id=eos_id,
                temperature=temperature if sampled else 0.0, float64=float64, kv_dtype=kv_dtype, V=V,
                shift=m.shift_logits, valid=valid[None], tau=tau)
            return {"x": xb[0], "done": db[0], "key": jax.random.key_data(key), "passes": rn[0]}

        def step(leaves, x, P, valid, block, done, key, tau, temperature):
            return jax.vmap(row, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0 if sampled else None))(
                leaves, x, P, valid, block, done, key, tau, temperature)

        self._programs[key] = jax.jit(step)
        while len(self._programs) > MAX_PROGRAMS:
            self._programs.popitem(last=False)
        return self._programs[key]

    def _run(self, program, arrays: dict, temperatures, sampled: bool) -> dict:
        args = [arrays[k] for k in ("x", "P", "valid", "block", "done", "key", "tau")]
        temp = np.asarray(temperatures, np.float32) if sampled else None
        with mesh_context(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if self.mesh is not None:
                args = [jax.device_put(a, batch_sharding(self.mesh) if a.ndim == 2 else
                                       jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(BATCH)))
                        for a in args]
            before = program._cache_size() if hasattr(program, "_cache_size") else None
            out = jax.device_get(program(self.leaves, *args, temp))
            if before is not None and program._cache_size() > before:
                self.compilations += 1
        return {k: np.asarray(v) for k, v in out.items()}

    def warmup(self, decode: DecodeConfig | None = None, *, temperature: float = 0.0, lengths=None, batches=None) -> None:
        """Compile the programs of `decode` for the given length and batch buckets (default: all),
        so that serving compiles nothing."""
        dc = _static(decode or DecodeConfig())
        for L in lengths or self.length_buckets:
            if dc.block_length > L - 1:
                continue
            for B in batches or self.batch_buckets:
                program = self._program(dc, temperature > 0, L, B)
                state = {"x": np.full((B, L), self.mask_id, np.int32), "P": np.ones(B, np.int32),
                         "valid": np.full(B, L, np.int32), "block": np.zeros(B, np.int32), "done": np.ones(B, bool),
                         "key": np.zeros((B, 2), np.uint32), "tau": np.full(B, 0.9, np.float32)}
                self._run(program, state, [max(temperature, 1.0)] * B, temperature > 0)
