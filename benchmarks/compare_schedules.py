"""Flat (MDLM), block(16), autoregressive and epsilon-hybrid at the same model size and token budget.

    python benchmarks/compare_schedules.py --budget-minutes M --out FILE [key=value ...]

All four train on the builtin corpus (configs/quickstart.yaml) for the number of steps the flat
model fits into M minutes (same steps, batch and seq_len: the same tokens). Block and
autoregressive train with the [clean | noised] layout (every block at once; the single layout
would train one block per row). Reports the validation NELBO in bits/byte — for epsilon-hybrid the
bound of its own process (dlm.diffusion.hybrid), for the others their hyperschedule NELBO — and
sampling seconds per 1,000 tokens (4 samples of seq_len tokens, compiled, KV cache on; flat
--sample-steps steps, block 16 steps per block, autoregressive one per token). JSON plus a
markdown table next to it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import ROOT, peak_rss_bytes, write_json, write_markdown_table

VARIANTS = [
    ("flat", []),
    ("block(16)", ["diffusion.hyperschedule=block", "diffusion.block_width=16", "diffusion.layout=double"]),
    ("autoregressive", ["diffusion.hyperschedule=autoregressive", "diffusion.layout=double"]),
    ("epsilon-hybrid", ["diffusion.process=epsilon_hybrid", "diffusion.epsilon=0.01"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=3.0, help="training minutes of the flat baseline")
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    parser.add_argument("--sample-steps", type=int, default=128)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import jax

    import dlm
    from dlm.config import load_config
    from dlm.train.metrics import read_metrics
    from dlm.train.trainer import Trainer

    rows, steps = [], None
    for name, extra in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            over = [f"workdir={tmp}", "train.eval_every=0", "train.progress=false", *extra, *args.overrides]
            if steps is None:  # calibrate on the baseline's steady-state tokens/s
                cfg = load_config(args.config, over + ["train.steps=30", "train.log_every=10"])
                Trainer(cfg).run()
                tps = sorted(r["tokens_per_second"] for r in read_metrics(cfg.workdir)[1:])
                steps = max(int(args.budget_minutes * 60 * tps[len(tps) // 2] / (cfg.train.batch_size * cfg.data.seq_len)), 20)
            cfg = load_config(args.config, over + [f"train.steps={steps}", f"workdir={tmp}/run"])
            t0 = time.time()
            result = Trainer(cfg).run()
            train_s = time.time() - t0
            model, cfg = dlm.restore(cfg.workdir)
            s = cfg.sampling
            s.num_samples, s.steps = 4, (16 if "block" in name else args.sample_steps)
            out = dlm.generate(model, None, s, diffusion=cfg.diffusion, length=cfg.data.seq_len,
                               mesh=dlm.api.make_mesh(devices=jax.devices()[:1]))
            tokens = out["tokens"].size
            rows.append({"model": name, "overrides": extra, "steps": steps,
                         "tokens": steps * cfg.train.batch_size * cfg.data.seq_len,
                         "nelbo_bits_per_byte": result["bits"], "nelbo_stderr": result["bits_stderr"],
                         "nelbo_nats_per_token": result["nelbo"], "train_seconds": train_s,
                         "sample_nfe": out["nfe"], "sample_steps": out["steps"], "sample_seconds": out["seconds"],
                         "sample_seconds_per_1000_tokens": 1000 * out["seconds"] / tokens})
            print(rows[-1], flush=True)
    record = {"budget_minutes": args.budget_minutes, "config": args.config, "overrides": args.overrides,
              "devices": jax.device_count(), "rows": rows, "peak_rss_bytes": peak_rss_bytes()}
    write_json(args.out, record)
    write_markdown_table(args.out, ["model", "steps", "validation NELBO (bits/byte)", "sampling s / 1,000 tokens", "NFE"],
                         [[r["model"], r["steps"], f"{r['nelbo_bits_per_byte']:.3f} ± {r['nelbo_stderr']:.3f}",
                           f"{r['sample_seconds_per_1000_tokens']:.2f}", r["sample_nfe"]] for r in rows])

if __name__ == "__main__":
    main()
