"""Host memory of importing a published checkpoint: a synthetic LLaDA-layout folder of >= 2 GB.

    python benchmarks/import_memory.py --out FILE [--dir DIR] [--layers 10] [--dtype bfloat16] [--keep]

The benchmark writes a LLaDA-8B-layout folder with random bfloat16 weights (LLaDA's vocabulary
of 126464 rows, width 2048, MLP 5632, `--layers` blocks: 2.07 GB at 10 layers; two shards and
their index, config.json and a tokenizer), then runs `python -m dlm.convert --from DIR --out
WORKDIR --dtype D` in a fresh process on one CPU device and reads that process's peak RSS
(getrusage of the child). The converter streams: one checkpoint tensor is read into a host
buffer, converted and copied into its device buffer at a time, so the peak should stay within
the parameters, two of the largest tensor (the read buffer and its converted copy), and the
runtime's own footprint. The record checks exactly that:

    peak_rss_bytes <= param_bytes + 2 * largest_tensor_bytes + 1 GB

The JSON record has exactly the keys peak_rss_bytes, param_bytes (the imported parameters'
bytes: the checkpoint's tensors in --dtype), largest_tensor_bytes (the largest checkpoint
tensor) and seconds (the conversion's wall time, one run: disk and memory traffic dominate it).
The bound, whether it held, and the runtime's baseline RSS (a process that imports dlm and
initialises JAX, before any tensor) are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, write_json

D, FF, VOCAB, HEADS = 2048, 5632, 126464, 16


def write_checkpoint(directory: pathlib.Path, layers: int, seed: int = 0) -> dict:
    import ml_dtypes
    import numpy as np

    from dlm.interop.safetensors import write

    rng = np.random.default_rng(seed)
    p = "model.transformer."
    shapes = {p + "wte.weight": (VOCAB, D), p + "ln_f.weight": (D,), p + "ff_out.weight": (VOCAB, D)}
    for i in range(layers):
        q = f"{p}blocks.{i}."
        shapes.update({q + "attn_norm.weight": (D,), q + "ff_norm.weight": (D,), q + "q_proj.weight": (D, D),
                       q + "k_proj.weight": (D, D), q + "v_proj.weight": (D, D), q + "attn_out.weight": (D, D),
                       q + "ff_proj.weight": (FF, D), q + "up_proj.weight": (FF, D), q + "ff_out.weight": (D, FF)})

    def random(shape):
        def make():
            out = np.empty(shape, ml_dtypes.bfloat16)
            flat = out.reshape(-1)
            step = 1 << 24
            for s in range(0, flat.size, step):  # in pieces: no float32 copy of a whole tensor
                n = min(step, flat.size - s)
                flat[s:s + n] = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            return out
        return make

    keys = list(shapes)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    directory.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        write(directory / name, [(k, shapes[k], ml_dtypes.bfloat16, random(shapes[k])) for k in part], {"format": "pt"})
        weight_map.update({k: name for k in part})
    nbytes = {k: 2 * int(np.prod(s)) for k, s in shapes.items()}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": sum(nbytes.values())},
                                                                       "weight_map": weight_map}))
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "d_model": D,
              "n_layers": layers, "n_heads": HEADS, "n_kv_heads": HEADS, "mlp_hidden_size": FF, "activation_type": "silu",
              "layer_norm_type": "rms", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "include_bias": False,
              "include_qkv_bias": False, "weight_tying": False, "vocab_size": VOCAB, "embedding_size": VOCAB,
              "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081, "bos_token_id": 126080}
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(ROOT / "tests/fixtures/pretrained/llada/tokenizer.json", directory / "tokenizer.json")
    shutil.copy(ROOT / "tests/fixtures/pretrained/llada/tokenizer_config.json", directory / "tokenizer_config.json")
    return {"param_bytes": sum(nbytes.values()), "largest_tensor_bytes": max(nbytes.values()),
            "checkpoint_bytes": sum(f.stat().st_size for f in directory.glob("*.safetensors")), "tensors": len(shapes)}


BASELINE = ("import resource, jax, dlm.convert; jax.devices(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
CONVERT = ("import resource, runpy, sys; sys.argv = ['dlm.convert'] + sys.argv[1:]; "
           "runpy.run_module('dlm.convert', run_name='__main__'); "
           "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def child_output(args, env) -> str:
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{args[:2]} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON record")
    parser.add_argument("--dir", default=None, help="A new or empty folder for the synthetic checkpoint and the workdir, removed when done (default: a temporary folder).")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="The imported parameters' dtype.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint and the workdir.")
    parser.add_argument("--write-only", default=None, help=argparse.SUPPRESS)  # the child that writes the checkpoint
    args = parser.parse_args()
    if args.write_only:
        print(json.dumps(write_checkpoint(pathlib.Path(args.write_only), args.layers)))
        return
    # Every measured step is its own process, and this one stays small: Linux carries a process's
    # peak RSS across fork and exec, so a child's getrusage would otherwise report the parent's.
    if args.dir and pathlib.Path(args.dir).exists() and any(pathlib.Path(args.dir).iterdir()):
        sys.exit(f"error: --dir {args.dir!r} is not empty; name a new folder (this benchmark removes it when done).")
    base = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="dlm-import-"))
    src, work = base / "llada-synthetic", base / "workdir"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(ROOT))
    try:
        t = time.time()
        info = json.loads(child_output([__file__, "--write-only", str(src), "--layers", str(args.layers)], env).splitlines()[-1])
        print(f"wrote {info['checkpoint_bytes'] / 1e9:.2f} GB ({info['tensors']} tensors, largest "
              f"{info['largest_tensor_bytes'] / 1e9:.2f} GB) in {time.time() - t:.0f}s")
        baseline = int(child_output(["-c", BASELINE], env).strip().splitlines()[-1])
        t = time.time()
        out = child_output(["-c", CONVERT, "--from", str(src), "--out", str(work), "--dtype", args.dtype], env)
        seconds = time.time() - t
        peak = int(next(line for line in out.splitlines() if line.startswith("PEAK")).split()[1])
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    param_bytes = info["param_bytes"] * (2 if args.dtype == "float32" else 1)
    bound = param_bytes + 2 * info["largest_tensor_bytes"] + (1 << 30)
    record = {"peak_rss_bytes": peak, "param_bytes": param_bytes, "largest_tensor_bytes": info["largest_tensor_bytes"],
              "seconds": round(seconds, 2)}
    print(f"peak RSS {peak / 1e9:.2f} GB for {param_bytes / 1e9:.2f} GB of parameters (largest tensor "
          f"{info['largest_tensor_bytes'] / 1e9:.2f} GB, runtime baseline {baseline / 1e9:.2f} GB); bound "
          f"{bound / 1e9:.2f} GB: {'within' if peak <= bound else 'EXCEEDED'}; {seconds:.1f}s")
    write_json(args.out, record)


if __name__ == "__main__":
    main()
