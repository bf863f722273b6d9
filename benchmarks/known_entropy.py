"""Train a small model on a source of known entropy rate and compare its NELBO with the truth.

    python benchmarks/known_entropy.py --config configs/markov.yaml --out FILE [key=value ...]

Writes entropy (exact, nats/token), nelbo and nelbo_stderr (the EMA model's validation NELBO
on fresh sequences, K stratified times each), their gap in % and in standard errors.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import peak_rss_bytes, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--workdir", default=None, help="keep the run here (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from dlm.config import Source, load_config
    from dlm.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"workdir={args.workdir or tmp}", *args.overrides])
        if cfg.data.source != Source.MARKOV:
            raise SystemExit("error: known_entropy needs data.source=markov (a source whose entropy is known).")
        t0 = time.time()
        trainer = Trainer(cfg)
        result = trainer.run()
        seconds = time.time() - t0
        entropy = trainer.data.markov.entropy_per_token(cfg.data.seq_len)
    nelbo, err = result["nelbo"], result["nelbo_stderr"]
    record = {
        "config": args.config, "overrides": args.overrides, "entropy": entropy, "nelbo": nelbo, "nelbo_stderr": err,
        "gap_percent": 100.0 * (nelbo - entropy) / entropy, "gap_stderrs": (nelbo - entropy) / err,
        "validation_sequences": cfg.data.markov.num_validation, "t_samples": cfg.train.eval_t_samples,
        "steps": result["step"], "seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
        "prime_l": cfg.diffusion.prime.l, "process": cfg.diffusion.process.value,
    }
    if "prime_joint_objective" in result:  # MDM-Prime's training objective: not a bound, reported apart
        record["prime_joint_objective"] = result["prime_joint_objective"]
    write_json(args.out, record)
    print(f"entropy {entropy:.4f}  NELBO {nelbo:.4f} ± {err:.4f} nats/token  ({record['gap_percent']:+.2f}%, "
          f"{record['gap_stderrs']:+.1f} s.e.)  in {seconds:.0f}s")


if __name__ == "__main__":
    main()
