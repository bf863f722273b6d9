"""dlm-eval: the NELBO of a trained model on a dataset, and the quality of samples.

    dlm-eval --workdir runs/quickstart --out eval.json                      # the run's validation NELBO
    dlm-eval --workdir W --split train --windows 1024 data.source=shards data.path=data/owt
    dlm-eval --samples runs/x/samples.jsonl --reference runs/ar --out s.json  # entropy, generative perplexity
    dlm-eval --workdir W --generate 16 --reference runs/ar sampling.steps=256

The NELBO goes through the trainer's own evaluator (dlm.eval.likelihood.Evaluator): with the
run's defaults (train.eval_windows evenly spaced validation windows, train.eval_t_samples
stratified times, the seed train.seed + 7, train.batch_size, the EMA parameters when
train.eval_use_ema) it reproduces the final validation NELBO in the run's metrics.jsonl.
`data.*` overrides evaluate on another source; its tokenizer must be the run's.

Samples (a JSONL file of {"text", "tokens"?} records, as sample.py writes, or --generate N from
the workdir's model) get the unigram entropy of their tokens and, with --reference, their
generative perplexity: exp of the mean negative log-likelihood per token under an
autoregressive dlm run (diffusion.hyperschedule=autoregressive, whose bound is the exact causal
likelihood). The samples, each followed by EOS, are cut into windows of the reference's seq_len;
the last, partial window is the stream's final seq_len tokens with the already scored ones as
a given prefix, so every token is scored exactly once with as much context as fits. The
autoregressive bound scores one position per time sample; with as many stratified samples as a
window has scored positions it visits each once and is the exact likelihood.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np

from dlm.config import ConfigError, Source
from dlm.data.sources import json_lines

TEXT_SOURCES = (Source.BUILTIN, Source.FILES, Source.HF, Source.TFDS)


def _checkpoint_step(workdir: pathlib.Path, step: int | None) -> int:
    from dlm.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, create=False)
    latest = ckpt.latest_step()
    ckpt.close()
    return step if step is not None else (0 if latest is None else latest)  # 0: the imported parameters (dlm.convert)


def _restore(workdir, step=None, use_ema=None, overrides=()):
    """(model, graphdef, params, cfg, tokenizer, checkpoint step) of a run."""
    from flax import nnx

    import dlm

    workdir = pathlib.Path(workdir)
    model, cfg = dlm.restore(workdir, use_ema=cfg_ema(workdir) if use_ema is None else use_ema, step=step)
    if overrides:
        cfg = dlm.load_config(workdir / "config.yaml", list(overrides))
    graphdef, params = nnx.split(model)
    return model, graphdef, params, cfg, dlm.load_tokenizer(workdir), _checkpoint_step(workdir, step)


def cfg_ema(workdir: pathlib.Path) -> bool:
    """The run's train.eval_use_ema; True for a folder without a config (dlm.restore then says
    what the folder lacks)."""
    from dlm.config import load_config

    path = workdir / "config.yaml"
    return load_config(path).train.eval_use_ema if path.exists() else True


def nelbo_report(workdir, *, split: str = "validation", windows: int | None = None, t_samples: int | None = None,
                 batch_size: int | None = None, seed: int | None = None, step: int | None = None, use_ema: bool | None = None,
                 overrides=()) -> dict:
    """The NELBO of a run's checkpoint on `split` of its data (or of the source the data.* overrides name)."""
    from dlm.data.pipeline import load_data, windows as pick
    from dlm.data.prepare import tokenizer_sha256
    from dlm.eval.likelihood import Evaluator
    from dlm.mesh import check_batch, make_mesh
    from dlm.objectives import run_objective

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ConfigError(f"dlm-eval takes data.* overrides only; {bad[0]!r} would change the trained model.")
    workdir = pathlib.Path(workdir)
    t0 = time.time()
    _, graphdef, params, cfg, tok, ckpt_step = _restore(workdir, step, use_ema, overrides)
    d = cfg.data
    data = load_data(d, workdir if d.source in TEXT_SOURCES else None, cfg.train.seed)  # checks a shard directory
    if d.source == Source.SHARDS and tokenizer_sha256(pathlib.Path(d.path)) != tokenizer_sha256(workdir):
        raise ConfigError(f"The shards in {d.path!r} were tokenised with another tokenizer than the run in {str(workdir)!r}; "
                          "prepare them with the run's data config.")
    if data.vocab_size != tok.vocab_size:
        raise ConfigError(f"The data's tokenizer has {data.vocab_size} tokens and the run's {tok.vocab_size}; evaluate on data "
                          "tokenised the run's way.")
    n = windows or cfg.train.eval_windows
    if split == "validation":
        rows = pick(data.val_rows, n)
    elif split == "train":
        rows = pick(data.train_rows, n) if data.train_rows is not None else data.draw_rows(cfg.train.seed, np.arange(n), d.seq_len)
    else:
        raise ConfigError(f"--split {split!r} is not a split; use validation or train.")
    mesh = make_mesh(cfg.mesh)
    bs = batch_size or cfg.train.batch_size
    check_batch(bs, mesh)
    objective = run_objective(cfg, tok.vocab_size)
    ev = Evaluator(graphdef, objective, rows, batch_size=bs, t_samples=t_samples or cfg.train.eval_t_samples,
                   seed=cfg.train.seed + 7 if seed is None else seed, bytes_per_token=data.bytes_per_token, mesh=mesh,
                   prime=cfg.diffusion.prime.l > 1)
    out = ev(params)
    out.pop("bits"), out.pop("bits_stderr")
    out.update(step=ckpt_step, split=split, source=d.source.value, unit=data.unit, bytes_per_token=data.bytes_per_token,
               workdir=str(workdir), seconds=time.time() - t0)
    return out


def read_samples(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        raise ConfigError(f"Samples file {str(path)!r} does not exist; write one with sample.py --out or pass --generate N.")
    out = []
    for n, rec in json_lines(path, str(path)):
        if not isinstance(rec, dict) or not (isinstance(rec.get("text"), str) or isinstance(rec.get("tokens"), list)):
            raise ConfigError(f"Line {n} of {str(path)!r} has neither a 'text' nor a 'tokens' field; samples are JSON records "
                              "as sample.py writes them.")
        out.append(rec)
    if not out:
        raise ConfigError(f"Samples file {str(path)!r} holds no samples.")
    return out


def unigram_entropy(token_lists, vocab_size: int) -> float:
    """Entropy (bits/token) of the pooled unigram distribution of the samples' tokens."""
    counts = np.bincount(np.concatenate([np.asarray(t, np.int64) for t in token_lists]), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def scoring_windows(stream: np.ndarray, seq_len: int) -> dict:
    """A token stream -> {"tokens", "given"} windows that score every token once: full windows,
    then the last seq_len tokens with the already scored part given."""
    n = len(stream)
    if n < seq_len:
        raise ConfigError(f"The samples hold {n} tokens, fewer than one window of the reference's data.seq_len={seq_len}; "
                          "evaluate more samples.")
    full = n // seq_len
    tokens = [stream[i * seq_len:(i + 1) * seq_len] for i in range(full)]
    given = [np.zeros(seq_len, bool) for _ in range(full)]
    rest = n - full * seq_len
    if rest:
        tokens.append(stream[-seq_len:])
        g = np.zeros(seq_len, bool)
        g[: seq_len - rest] = True
        given.append(g)
    return {"tokens": np.stack(tokens).astype(np.int32), "given": np.stack(given)}


def generative_perplexity(token_lists, reference, batch_size: int = 8) -> dict:
    """Mean NLL (nats/token) and perplexity of the samples under an autoregressive run."""
    import jax

    from dlm.config import HyperscheduleKind
    from dlm.data.pipeline import take_rows
    from dlm.eval.likelihood import make_eval_fn
    from dlm.objectives import run_objective

    _, graphdef, params, cfg, tok, _ = _restore(reference, use_ema=True)
    if cfg.diffusion.hyperschedule != HyperscheduleKind.AUTOREGRESSIVE:
        raise ConfigError(f"The reference run {str(reference)!r} is not autoregressive (diffusion.hyperschedule="
                          f"{cfg.diffusion.hyperschedule.value}); generative perplexity needs exact likelihoods: train the reference "
                          "with diffusion.hyperschedule=autoregressive.")
    parts = []
    for t in token_lists:
        t = np.asarray(t, np.int64)
        if len(t) and (t.min() < 0 or t.max() >= tok.vocab_size):
            raise ConfigError(f"A sample holds token {int(t.max()) if t.max() >= tok.vocab_size else int(t.min())}, outside the "
                              f"reference's vocabulary of {tok.vocab_size} (an unfilled mask, or another tokenizer's ids).")
        parts += [t, np.asarray([tok.eos_id], np.int64)] if tok.eos_id >= 0 else [t]
    rows = scoring_windows(np.concatenate(parts), cfg.data.seq_len)
    objective = run_objective(cfg, tok.vocab_size)
    # The autoregressive bound draws one position (a one-token block) per time sample; K
    # stratified samples over a window of K scored positions visit each exactly once, so the
    # bound is then the exact mean NLL. Full windows: K = seq_len; the partial one: K = its rest.
    scored = (~rows["given"]).sum(axis=1)
    total, count = 0.0, 0
    for k in sorted(set(scored.tolist())):
        fn = make_eval_fn(graphdef, objective, int(k))
        idx = np.flatnonzero(scored == k)
        b = min(batch_size, len(idx))
        padded = np.concatenate([idx, np.full((-len(idx)) % b, idx[0])])  # one batch shape: one compilation
        for i in range(0, len(idx), b):
            per, _ = fn(params, take_rows(rows, padded[i:i + b]), jax.random.key(i))
            real = min(b, len(idx) - i)
            total += float(np.asarray(per, np.float64)[:real].sum()) * k
            count += int(k) * real
    nll = total / count
    return {"gen_nll": nll, "gen_perplexity": math.exp(nll), "gen_tokens": count, "reference": str(reference)}


def samples_report(samples, *, workdir=None, reference=None) -> dict:
    """Entropy (and generative perplexity under `reference`) of sample records."""
    from dlm.data.prepare import tokenizer_sha256
    from dlm.data.tokenizers import load_tokenizer

    gen_tok = load_tokenizer(workdir) if workdir is not None else None
    ref_tok = load_tokenizer(reference) if reference is not None else None
    if reference is not None and ref_tok is None:
        raise ConfigError(f"{str(reference)!r} holds no tokenizer.json; --reference names a directory written by train.py.")
    same = gen_tok is not None and ref_tok is not None and tokenizer_sha256(pathlib.Path(workdir)) == tokenizer_sha256(pathlib.Path(reference))
    have_tokens = all(isinstance(s.get("tokens"), list) for s in samples)

    def tokens_for(tok, use_ids):
        if use_ids:
            return [np.asarray(s["tokens"], np.int64) for s in samples]
        missing = [i for i, s in enumerate(samples) if not isinstance(s.get("text"), str)]
        if missing:
            raise ConfigError(f"Sample {missing[0] + 1} has no 'text' to tokenise with the reference's tokenizer.")
        return [np.asarray(tok.encode(s["text"]), np.int64) for s in samples]

    out = {"samples": len(samples)}
    if have_tokens and gen_tok is not None:
        ids = tokens_for(gen_tok, True)
        out["unigram_entropy_bits"], out["entropy_tokenizer"] = unigram_entropy(ids, gen_tok.vocab_size + 1), "generator"
    elif ref_tok is not None:
        ids = tokens_for(ref_tok, False)
        out["unigram_entropy_bits"], out["entropy_tokenizer"] = unigram_entropy(ids, ref_tok.vocab_size), "reference"
    elif have_tokens:
        ids = tokens_for(None, True)
        out["unigram_entropy_bits"], out["entropy_tokenizer"] = unigram_entropy(ids, int(max(t.max() for t in ids if len(t))) + 1), "ids"
    else:
        raise ConfigError("Text samples need a tokenizer: pass --workdir (the generating run) or --reference.")
    out["sample_tokens"] = int(sum(len(t) for t in ids))
    if reference is not None:
        out.update(generative_perplexity(tokens_for(ref_tok, have_tokens and same), reference))
    return out


def generate_samples(workdir, n: int, overrides=()) -> list[dict]:
    """n samples of a run's model with its sampling config (sampling.* overrides apply)."""
    import dlm
    from dlm.mesh import make_mesh

    bad = [o for o in overrides if not o.startswith("sampling.")]
    if bad:
        raise ConfigError(f"With --generate, overrides are sampling.* keys; {bad[0]!r} is not one.")
    workdir = pathlib.Path(workdir)
    model, cfg = dlm.restore(workdir)
    if overrides:
        cfg = dlm.load_config(workdir / "config.yaml", list(overrides))
    tok = dlm.load_tokenizer(workdir)
    cfg.sampling.num_samples = n
    out = dlm.generate(model, None, cfg.sampling, diffusion=cfg.diffusion, length=cfg.sampling.length or cfg.data.seq_len,
                       mesh=make_mesh(cfg.mesh), eos_id=getattr(tok, "eos_id", -1))
    return [{"text": tok.decode(row), "tokens": np.asarray(row).tolist()} for row in out["tokens"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="dlm-eval", description="Evaluate a trained dlm run: NELBO on a dataset, or sample quality.",
                                     epilog="Overrides: data.* keys pick another source for the NELBO (e.g. data.source=shards "
                                            "data.path=DIR); with --generate, sampling.* keys.")
    parser.add_argument("--workdir", help="A run written by train.py.")
    parser.add_argument("--split", default="validation", help="validation (default) or train.")
    parser.add_argument("--windows", type=int, default=None, help="Windows evaluated (default train.eval_windows).")
    parser.add_argument("--t-samples", type=int, default=None, help="Time draws per window (default train.eval_t_samples).")
    parser.add_argument("--batch-size", type=int, default=None, help="Default train.batch_size (changes the draws).")
    parser.add_argument("--seed", type=int, default=None, help="Default train.seed + 7, the trainer's.")
    parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default the newest).")
    parser.add_argument("--no-ema", action="store_true", help="Raw parameters instead of the EMA.")
    parser.add_argument("--samples", default=None, help="A samples.jsonl to evaluate instead of the NELBO.")
    parser.add_argument("--generate", type=int, default=None, metavar="N", help="Generate N samples from --workdir and evaluate them.")
    parser.add_argument("--reference", default=None, help="An autoregressive run: generative perplexity of the samples under it.")
    parser.add_argument("--out", default=None, help="Write the report as JSON here.")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from dlm.train.checkpoint import RestoreError

    try:
        if args.samples or args.generate:
            if args.generate and not args.workdir:
                raise ConfigError("--generate needs --workdir, the run to sample from.")
            samples = read_samples(args.samples) if args.samples else generate_samples(args.workdir, args.generate, args.overrides)
            report = samples_report(samples, workdir=args.workdir, reference=args.reference)
            line = (f"{report['samples']} samples, {report['sample_tokens']} tokens: unigram entropy {report['unigram_entropy_bits']:.3f} bits"
                    + (f", generative perplexity {report['gen_perplexity']:.3f} ({report['gen_nll']:.4f} nats/token under "
                       f"{report['reference']})" if "gen_perplexity" in report else ""))
        else:
            if not args.workdir:
                raise ConfigError("Pass --workdir (a run to evaluate) or --samples FILE.")
            report = nelbo_report(args.workdir, split=args.split, windows=args.windows, t_samples=args.t_samples,
                                  batch_size=args.batch_size, seed=args.seed, step=args.step,
                                  use_ema=False if args.no_ema else None, overrides=args.overrides)
            line = (f"step {report['step']}: {report['split']} NELBO {report['nelbo']:.4f} ± {report['nelbo_stderr']:.4f} nats/token, "
                    f"{report['bits_per_byte']:.4f} {report['unit']}, perplexity {report['perplexity']:.3f} "
                    f"({report['windows']} windows x {report['t_samples']} times, {report['source']})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(line)


if __name__ == "__main__":
    main()
