"""MDLM vs MDM-Prime (l = 2, 4) at the same model size and token budget on the builtin corpus.

    python benchmarks/compare_prime.py --budget-minutes M --out FILE [key=value ...]

Each model trains for the number of steps that MDLM fits into M minutes (same steps, batch and
sequence length, so the same tokens for all). Reports the valid NELBO (bits/byte: the bound),
the Prime joint objective (not a bound), and sampling NFE and idle-step ratio. Writes JSON and
a markdown table next to it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import ROOT, peak_rss_bytes, write_json, write_markdown_table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=3.0, help="training minutes for the MDLM baseline")
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    parser.add_argument("--ls", default="1,2,4", help="sub-token counts to compare (1 = MDLM)")
    parser.add_argument("--sample-steps", type=int, default=128)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import jax

    import dlm
    from dlm.config import load_config
    from dlm.mesh import make_mesh
    from dlm.train.trainer import Trainer

    rows, steps = [], None
    for l in [int(v) for v in args.ls.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            over = [f"workdir={tmp}", f"diffusion.prime.l={l}", "train.eval_every=0", "train.progress=false", *args.overrides]
            if steps is None:  # calibrate the step count on the baseline: its steady-state tokens/s
                cfg = load_config(args.config, over + ["train.steps=30", "train.log_every=10"])
                Trainer(cfg).run()
                from dlm.train.metrics import read_metrics

                tps = sorted(r["tokens_per_second"] for r in read_metrics(cfg.workdir)[1:])  # the first includes compilation
                per_step = cfg.train.batch_size * cfg.data.seq_len / tps[len(tps) // 2]
                steps = max(int(args.budget_minutes * 60 / per_step), 20)
            cfg = load_config(args.config, over + [f"train.steps={steps}", f"workdir={tmp}/run"])
            t0 = time.time()
            trainer = Trainer(cfg)
            result = trainer.run()
            train_s = time.time() - t0
            model, cfg = dlm.restore(cfg.workdir)
            cfg.sampling.steps = args.sample_steps
            cfg.sampling.num_samples = 4
            out = dlm.generate(model, None, cfg.sampling, diffusion=cfg.diffusion, length=cfg.data.seq_len,
                               mesh=make_mesh(cfg.mesh))
            rows.append({"l": l, "model": "MDLM" if l == 1 else f"Prime l={l}", "steps": steps,
                         "tokens": steps * cfg.train.batch_size * cfg.data.seq_len,
                         "nelbo_bits_per_byte": result["bits"], "nelbo_stderr": result["bits_stderr"],
                         "nelbo_nats_per_token": result["nelbo"],
                         "joint_objective_nats_per_token": result.get("prime_joint_objective", result["nelbo"]),
                         "nfe": out["nfe"], "sample_steps": out["steps"], "idle_step_ratio": out["idle_step_ratio"],
                         "train_seconds": train_s, "sample_seconds": out["seconds"]})
            print(rows[-1], flush=True)
    record = {"budget_minutes": args.budget_minutes, "config": args.config, "overrides": args.overrides,
              "devices": jax.device_count(), "rows": rows, "peak_rss_bytes": peak_rss_bytes()}
    write_json(args.out, record)
    write_markdown_table(args.out, ["model", "steps", "valid NELBO (bits/byte)", "joint objective (nats/token, not a bound)",
                                    "NFE", "idle-step ratio"],
                         [[r["model"], r["steps"], f"{r['nelbo_bits_per_byte']:.3f} ± {r['nelbo_stderr']:.3f}",
                           f"{r['joint_objective_nats_per_token']:.4f}", f"{r['nfe']} / {r['sample_steps']}",
                           f"{r['idle_step_ratio']:.2%}"] for r in rows])

if __name__ == "__main__":
    main()
