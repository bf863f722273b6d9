"""lm-eval-harness adapter: python -m dlm.eval.harness --workdir W --tasks T [--include-path DIR].

The three request kinds of lm_eval, on a dlm run (or a converted checkpoint):

- generate_until: through the serving engine (dlm.serve.engine: the parallel decoder with
  continuous batching, for flat absorbing runs; settings from the run's sampling.decode and
  sampling.* overrides), the text cut at the first of the request's `until` strings; greedy
  unless do_sample (then at the task's temperature, default 1, each request with its own seed);
- loglikelihood(context, continuation): minus the conditional bound of the continuation given
  the context, -NELBO(continuation | context) summed over its tokens: the objective's bound at K
  stratified times (--t-samples), the same draws for every request (common random numbers, so
  the choices of a question are compared on the same masks; for a block hyperschedule the
  oldest context tokens are dropped to make the pair whole blocks), i.e. exactly
  -dlm.nelbo(model, pair, diffusion, key, K, given=context)[0] * len(continuation). It is a lower
  bound of log p, so choices are ranked by their bounds. For an autoregressive hyperschedule the
  bound at K = len(continuation) visits each position once and is the exact log-likelihood.
  is_greedy: whether greedy decoding of len(continuation) tokens gives the continuation;
- loglikelihood_rolling(text): minus the NELBO of the text through dlm-eval's scoring windows
  (dlm.eval.command.scoring_windows: full windows, then the last one with the scored part given)
  and evaluator (dlm.eval.likelihood.make_eval_fn).

The standard error of each loglikelihood over its K samples (stratified, so it overstates the
error) is kept in `DlmLM.stderr` (one per request, in order), and written with --out.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from dlm.config import ConfigError, HyperscheduleKind, check_sampling_overrides

try:
    from lm_eval.api.model import LM
except ImportError:  # lm_eval is the optional `eval` extra: only this module needs it
    LM = object


class DlmLM(LM):
    """An lm_eval model over a dlm model, its run config and tokenizer."""

    def __init__(self, model, cfg, tok, *, t_samples: int = 16, seed: int = 0, batch_buckets=(1, 8, 32), mesh=None):
        if LM is object:
            raise ConfigError("The lm-eval adapter needs the lm_eval package: pip install -c constraints.txt -e '.[eval]'.")
        super().__init__()
        from dlm.diffusion import hyperschedules as hs
        from dlm.objectives import SamplerFamily, objective_for
        from dlm.serve.engine import Engine

        self.model, self.cfg, self.tok = model, cfg, tok
        self.t_samples, self.seed, self.mesh = t_samples, seed, mesh
        self.context = cfg.data.seq_len
        self.eos_id = getattr(tok, "eos_id", -1)
        self.objective = objective_for(cfg.diffusion, model.mask_id, model.cfg.noise_conditioning, model.vocab_size)
        self.exact = cfg.diffusion.hyperschedule == HyperscheduleKind.AUTOREGRESSIVE
        kind = cfg.diffusion.hyperschedule
        self.width = 1 if kind == HyperscheduleKind.FLAT else hs.width_for(kind, self.context, cfg.diffusion.block_width)
        # generations go through the engine: the parallel decoder, for flat absorbing runs
        self.engine = (Engine(model, eos_id=self.eos_id, max_length=self.context, batch_buckets=batch_buckets, mesh=mesh,
                              float64=cfg.sampling.float64) if self.objective.sampler == SamplerFamily.TOKENS else None)
        self.graphdef, self.params = nnx.split(model)
        self._bounds, self._windows = {}, {}
        self._requests = 0
        self.stderr: list[float] = []

    # ------------------------------------------------------------------ helpers

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)] if text else []

    def _bound_fn(self, K: int):
        if K not in self._bounds:
            from dlm.objectives import denoiser

            graphdef, objective = self.graphdef, self.objective

            def fn(params, tokens, given, key):
                return objective.bound_samples(denoiser(nnx.merge(graphdef, params)), tokens, key, K, given=given)[0]

            self._bounds[K] = jax.jit(fn)
        return self._bounds[K]

    def pair(self, context: str, continuation: str):
        """(tokens [1, L], given [1, L]) of a pair: the context's tokens (cut from the left to fit
        the model's context, and for a block hyperschedule to make L whole blocks) then the
        continuation's."""
        ctx, cont = self.encode(context), self.encode(continuation)
        if not cont:
            raise ConfigError("A loglikelihood request has an empty continuation; there is nothing to score.")
        if len(cont) > self.context:
            raise ConfigError(f"A continuation of {len(cont)} tokens is longer than the model's context of {self.context}.")
        ctx = ctx[max(0, len(ctx) + len(cont) - self.context):]
        if self.width > 1:  # the hyperschedule tiles the sequence with blocks: drop the oldest context tokens
            ctx = ctx[(len(ctx) + len(cont)) % self.width:]
            if (len(ctx) + len(cont)) % self.width:
                raise ConfigError(f"A pair of {len(ctx) + len(cont)} tokens is not whole blocks of {self.width} and its context "
                                  "is too short to trim; this block-hyperschedule run cannot score it.")
        tokens = np.asarray([ctx + cont], np.int32)
        given = np.zeros(tokens.shape, bool)
        given[0, :len(ctx)] = True
        return tokens, given

    def conditional_loglikelihood(self, tokens, given) -> tuple[float, float]:
        """(log-likelihood bound of the continuation given the context, its standard error over
        the K samples) of a pair (tokens, given) from pair(): minus the conditional NELBO summed
        over the continuation's tokens."""
        n = int((~given).sum())
        K = n if self.exact else self.t_samples
        samples = np.asarray(self._bound_fn(K)(self.params, tokens, given, jax.random.key(self.seed)))[:, 0]
        total = np.float32(0.0)
        for v in samples:  # summed in order and in float32, as bound() sums them
            total = np.float32(total + v)
        ll = -float(total / np.float32(K)) * n
        per = -samples.astype(np.float64) * n
        err = 0.0 if self.exact or K < 2 else float(per.std(ddof=1) / math.sqrt(K))
        return ll, err

    # ------------------------------------------------------------------ lm_eval's interface

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            tokens, given = self.pair(*req.args[:2])
            ll, err = self.conditional_loglikelihood(tokens, given)
            self.stderr.append(err)
            n = int((~given).sum())
            P = int(given.sum())
            greedy = False
            if P and self.engine is not None:
                dc = self.cfg.sampling.decode
                got = self.engine.generate([tokens[0, :P]], n, decode=dc)[0]
                greedy = bool(np.array_equal(got, tokens[0, P:]))
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from dlm.eval.command import scoring_windows
        from dlm.eval.likelihood import make_eval_fn

        out = []
        for req in requests:
            stream = np.asarray(self.encode(req.args[0]), np.int64)
            if len(stream) == 0:
                out.append(0.0)
                continue
            if len(stream) < self.context:
                if len(stream) % self.width:
                    raise ConfigError(f"A text of {len(stream)} tokens is not whole blocks of {self.width}; this "
                                      "block-hyperschedule run scores texts of at least its context length only.")
                rows = {"tokens": stream[None].astype(np.int32), "given": np.zeros((1, len(stream)), bool)}
            else:
                rows = scoring_windows(stream, self.context)
            scored = (~rows["given"]).sum(axis=1)
            total = 0.0
            for i in range(len(scored)):
                K = int(scored[i]) if self.exact else self.t_samples
                if K not in self._windows:  # one compiled evaluator per K (jit caches the shapes)
                    self._windows[K] = make_eval_fn(self.graphdef, self.objective, K)
                fn = self._windows[K]
                per, _ = fn(self.params, {k: v[i:i + 1] for k, v in rows.items()}, jax.random.key(self.seed))
                total += float(np.asarray(per, np.float64)[0]) * int(scored[i])
            out.append(-total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.engine is None:
            raise ConfigError("generate_until decodes with the parallel decoder, for flat absorbing runs; this run's "
                              "hyperschedule, process or Prime setting has loglikelihood tasks only here.")
        reqs = []
        for req in requests:
            context, kw = req.args[0], dict(req.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.get("max_gen_toks", 256))
            max_gen = min(max_gen, self.context - 1)
            ids = self.encode(context) or ([self.eos_id] if self.eos_id >= 0 else [0])
            ids = ids[max(0, len(ids) + max_gen - self.context):]
            temperature = float(kw.get("temperature", 1.0)) if kw.get("do_sample", False) else 0.0
            dc = self.cfg.sampling.decode
            self._requests += 1  # each request its own draws (repeats of a task sample anew)
            reqs.append((self.engine.submit(ids, max_gen, decode=dc, temperature=temperature, seed=self.seed + self._requests),
                         until))
        self.engine.run()
        stops = set(getattr(self.tok, "stop_ids", [])) | ({self.eos_id} if self.eos_id >= 0 else set())
        out = []
        for r, until in reqs:
            tokens = [int(t) for t in r.tokens]
            cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
            text = self.tok.decode(np.asarray(tokens[:cut], np.int32))
            for u in until:
                if u and u in text:
                    text = text[:text.index(u)]
            out.append(text)
        return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlm.eval.harness", description="Run lm-eval-harness tasks on a dlm run.")
    parser.add_argument("--workdir", required=True, help="A run written by train.py or dlm.convert.")
    parser.add_argument("--tasks", required=True, help="Comma-separated lm_eval task names.")
    parser.add_argument("--include-path", default=None, help="A folder of task YAML files (local tasks, local datasets).")
    parser.add_argument("--t-samples", type=int, default=16, help="K, the stratified time samples of each loglikelihood.")
    parser.add_argument("--limit", type=float, default=None, help="At most this many documents per task (or a fraction).")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="A JSON file for the results.")
    parser.add_argument("overrides", nargs="*", help="sampling.* keys for generation, e.g. sampling.decode.tau=0.8")
    args = parser.parse_args(argv)
    from dlm.train.checkpoint import RestoreError

    try:
        import dlm

        check_sampling_overrides(args.overrides, "The harness")
        if args.t_samples < 1:
            raise ConfigError(f"--t-samples={args.t_samples} must be at least 1.")
        if args.include_path is not None and not pathlib.Path(args.include_path).is_dir():
            raise ConfigError(f"--include-path {args.include_path!r} is not a folder of task YAML files.")
        if LM is object:
            raise ConfigError("The lm-eval adapter needs the lm_eval package: pip install -c constraints.txt -e '.[eval]'.")
        workdir = pathlib.Path(args.workdir)
        model, cfg = dlm.restore(workdir)
        if args.overrides:
            cfg = dlm.load_config(workdir / "config.yaml", args.overrides)
        lm = DlmLM(model, cfg, dlm.load_tokenizer(workdir), t_samples=args.t_samples, seed=args.seed)
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        tasks = [t for t in args.tasks.split(",") if t]
        manager = TaskManager(include_path=args.include_path)
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise ConfigError(f"lm_eval has no task {missing[0]!r}; check the name, or pass --include-path with its YAML.")
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                  random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=None,
                                  fewshot_random_seed=args.seed, log_samples=False)
    except (ConfigError, RestoreError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report = {"results": results["results"], "loglikelihood_stderr_mean": float(np.mean(lm.stderr)) if lm.stderr else None,
              "t_samples": args.t_samples, "workdir": str(workdir)}
    for task, values in results["results"].items():
        print(task, {k: v for k, v in values.items() if isinstance(v, (int, float))})
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
