"""Weak scaling of the LLaDA-8B pretraining plan on v5p: 16, 32, 64 and 128 chips at a fixed
per-chip batch (4 rows of 4096 tokens), compiled for each topology by dlm.plan on this host.

    python benchmarks/plan_scaling.py --out FILE [--rows-per-chip 4] [--config configs/llada8b_pretrain.yaml]

Per chip, FSDP should give: the state (parameters, Adam's moments, EMA) proportional to
1 / chips; temporaries flat, except for the buffers shaped like the parameters (gradients, the
optimizer's update), which are sharded like them and so shrink like the state (the benchmark
fits temp = flat + sharded / chips and reports the flat part at every size);
and weight traffic per step near 3 x the parameters in the compute dtype (each layer's weights
all-gathered for the forward pass, again for the rematerialised forward and the backward pass)
plus the gradients' reduction, whatever the chip count. The record has one row per chip count
and those three ratios; the plot shows them against chips. Compiles only: a compiler's view,
not a measured step (README "Plan a pod run").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

TOPOLOGIES = {16: "v5p:2x2x4", 32: "v5p:2x4x4", 64: "v5p:4x4x4", 128: "v5p:4x4x8"}


def plot(record: dict, path) -> None:
    """State, temporaries (and their part that does not shrink) and ICI traffic against chips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    chips = [r["chips"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.plot(chips, [r["state_bytes_per_chip"] / 2**30 for r in rows], "o-", label="state (params, Adam, EMA)")
    ax.plot(chips, [r["state_total_bytes"] / r["chips"] / 2**30 for r in rows], "k:", label="state total / chips")
    ax.plot(chips, [r["temp_bytes"] / 2**30 for r in rows], "s-", label="temporaries")
    ax.plot(chips, [r["temp_flat_part_bytes"] / 2**30 for r in rows], "s--", label="temporaries less gradient-shaped buffers")
    ax.set_ylabel("GiB per chip")
    ax.set_title("Memory per chip")
    bx.plot(chips, [sum(c["bytes"] for c in r["collectives"] if not c["dcn"]) / 1e9 for r in rows], "^-",
            label="collective bytes per step")
    bx.plot(chips, [3 * r["matmul_weight_bytes_bf16"] / 1e9 for r in rows], "k:", label="3 x the bf16 weights")
    bx.set_ylabel("GB per chip per step")
    bx.set_title("FSDP traffic per chip")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xticks(chips, [str(c) for c in chips])
        a.set_xlabel(f"v5p chips ({record['rows_per_chip']} rows of 4096 tokens each)")
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("LLaDA-8B pretraining plan, as compiled for v5p (weak scaling)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parents[1] / "configs/llada8b_pretrain.yaml"))
    p.add_argument("--rows-per-chip", type=int, default=4)
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON at --out, compiling nothing")
    args = p.parse_args()
    if args.replot:
        out = pathlib.Path(args.out)
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0
    from dlm.config import load_config
    from dlm.plan import matmul_params, plan

    rows = []
    for chips, topo in TOPOLOGIES.items():
        cfg = load_config(args.config, [f"train.batch_size={args.rows_per_chip * chips}"])
        r = plan(cfg, topo, "train")
        pc = r["per_chip"]
        state = pc["params_bytes"] + pc["optimizer_bytes"] + pc["ema_bytes"]
        n = matmul_params(cfg.model, cfg.model.vocab_size)
        compute_bytes = (n["layers"] + n["head"]) * 2  # the matmul weights in bfloat16
        ici = sum(c["traffic_bytes"] for c in r["collectives"] if not c["dcn"])
        row = {"chips": chips, "topology": topo, "state_bytes_per_chip": state, "state_total_bytes": r["state_total_bytes"],
               "temp_bytes": pc["temp_bytes"], "total_bytes": pc["total_bytes"], "fits": r["fits"],
               "ici_traffic_bytes": ici, "collectives": r["collectives"], "matmul_weight_bytes_bf16": compute_bytes,
               "traffic_over_weights": ici / compute_bytes, "mfu": r["roofline"]["mfu"],
               "step_seconds": r["roofline"]["step_seconds"]}
        rows.append(row)
        print(f"{chips:4d} chips {topo:11s} state/chip {state / 2**30:7.3f} GiB (total/chips {r['state_total_bytes'] / chips / 2**30:7.3f}),"
              f" temp {pc['temp_bytes'] / 2**30:7.2f} GiB, total {pc['total_bytes'] / 2**30:6.2f} GiB, ICI traffic "
              f"{ici / 1e9:7.1f} GB = {ici / compute_bytes:4.2f} x the bf16 weights, MFU <= {row['mfu']:.1%}", flush=True)
    base = rows[0]
    for row in rows:
        row["state_ratio_to_ideal"] = row["state_bytes_per_chip"] / (row["state_total_bytes"] / row["chips"])
        row["temp_ratio_to_16"] = row["temp_bytes"] / base["temp_bytes"]
    # temporaries = a part that does not depend on the chip count (the chip's own activations,
    # one layer's gathered weights, the gathered head) + parameter-shaped buffers that shard
    # like the state (the gradients, the update): least squares of temp = flat + per / chips
    A = np.array([[1.0, 1.0 / r["chips"]] for r in rows])
    flat, per = np.linalg.lstsq(A, np.array([r["temp_bytes"] for r in rows], float), rcond=None)[0]
    param_f32 = rows[0]["state_total_bytes"] / 4  # parameters, mu, nu, EMA: four float32 copies
    for row in rows:
        row["temp_flat_part_bytes"] = row["temp_bytes"] - per / row["chips"]
    flat_parts = [r["temp_flat_part_bytes"] for r in rows]
    print("state per chip / (total / chips):", ", ".join(f"{r['state_ratio_to_ideal']:.4f}" for r in rows))
    print("temp / temp at 16 chips:        ", ", ".join(f"{r['temp_ratio_to_16']:.3f}" for r in rows))
    print(f"temp = {flat / 2**30:.2f} GiB + {per / 2**30:.1f} GiB / chips ({per / param_f32:.2f} x the float32 parameters: "
          f"gradients and update sharded like the state); the part that does not shrink, per chip count: "
          + ", ".join(f"{x / 2**30:.2f}" for x in flat_parts) + f" GiB (spread {max(flat_parts) / min(flat_parts) - 1:.1%})")
    fit = {"temp_flat_bytes": float(flat), "temp_sharded_bytes_times_chips": float(per),
           "temp_sharded_over_param_f32": float(per / param_f32),
           "temp_flat_part_spread": float(max(flat_parts) / min(flat_parts) - 1)}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "rows_per_chip": args.rows_per_chip, "temp_fit": fit, "rows": rows},
                              indent=1) + "\n")
    plot(json.loads(out.read_text()), out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
