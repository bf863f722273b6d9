"""Decoders judged on a task with a checkable answer: exact-solve rate (with a 95% interval),
cell accuracy, forward passes per puzzle and puzzles per second."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dlm.config import DiffusionConfig, SamplingConfig
from dlm.sampling.generate import generate
from dlm.tasks import addition, sudoku


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def decode_all(model, diffusion: DiffusionConfig, specs: np.ndarray, sampling: SamplingConfig, batch: int, mesh=None):
    """Fill the mask positions of every row of `specs` [N, L] in batches, each batch with its own
    key -> (tokens [N, L], NFE per row [N], compiled decoding seconds). NFE is per row for the parallel decoder and the token
    ancestral loop (rows stop at different steps), per batch otherwise."""
    import jax

    tokens, nfe, seconds = [], [], 0.0
    root = jax.random.key(sampling.seed)
    for i in range(0, len(specs), batch):
        spec = specs[i: i + batch]
        # every batch its own key (folded from the seed), so no two puzzles share their draws: the
        # intervals assume independent trials
        out = generate(model, spec, dataclasses.replace(sampling, num_samples=len(spec)), diffusion=diffusion,
                       length=spec.shape[1], mesh=mesh, key=jax.random.fold_in(root, i))
        tokens.append(np.asarray(out["tokens"]))
        nfe += list(out.get("nfe_per_sample", [out["nfe"]] * len(spec)))
        seconds += out["seconds"]
    return np.concatenate(tokens), np.asarray(nfe, np.float64), seconds


def _report(solved: np.ndarray, correct: int, total: int, nfe: np.ndarray, seconds: float) -> dict:
    n = len(solved)
    k = int(np.sum(solved))
    return {"exact_solve": k / n, "exact_solve_ci": list(wilson_interval(k, n)), "cell_accuracy": correct / total,
            "nfe": float(np.mean(nfe)), "puzzles_per_second": n / seconds, "num_puzzles": n}


def solve_sudoku(model, diffusion: DiffusionConfig, puzzles: np.ndarray, solutions: np.ndarray, sampling: SamplingConfig,
                 batch: int = 100, mesh=None, prefix: bool = False) -> dict:
    """Decode every puzzle [N, n, n] (0 = blank) under `sampling`: by infill with its givens fixed
    in place (a model of solved grids), or with prefix=True after the puzzle as a prompt (a
    data.format=pairs model: the puzzle with a blank token, then the grid).

    Returns exact_solve (valid grid keeping the givens), exact_solve_ci, cell_accuracy (blank cells
    equal to the unique solution), nfe (mean forward passes per puzzle), puzzles_per_second
    (compiled decoding time), num_puzzles."""
    geo = sudoku.Geometry(puzzles.shape[-1])
    if prefix:
        specs = sudoku.prompt_pair(puzzles, blank_id=geo.size)
        if model.vocab_size != geo.size + 1:
            raise ValueError(f"A prompt/response Sudoku model has {geo.size + 1} tokens (digits and the blank), not {model.vocab_size}.")
    else:
        specs = sudoku.encode(puzzles, model.vocab_size)
    tokens, nfe, seconds = decode_all(model, diffusion, specs, sampling, batch, mesh)
    grids = sudoku.decode(tokens[:, -geo.cells:], geo.size)
    solved = np.array([sudoku.check(geo, g, q) for g, q in zip(grids, puzzles)])
    holes = puzzles == 0
    return _report(solved, int((grids == solutions)[holes].sum()), int(holes.sum()), nfe, seconds)


def solve_addition(model, diffusion: DiffusionConfig, a: np.ndarray, b: np.ndarray, sampling: SamplingConfig,
                   batch: int = 100, mesh=None) -> dict:
    """Decode the sum of every problem (a, b) [N, digits] after its operands (the prompt) under
    `sampling`: exact_solve (every sum digit right) with its interval, cell_accuracy (sum digits
    right), nfe, puzzles_per_second, num_puzzles."""
    layout = addition.Layout(a.shape[1])
    specs = addition.rows(a, b)
    specs[:, layout.prompt_length:] = model.vocab_size
    tokens, nfe, seconds = decode_all(model, diffusion, specs, sampling, batch, mesh)
    right = addition.sums(tokens, layout) == addition.add(a, b)
    return _report(right.all(axis=1), int(right.sum()), right.size, nfe, seconds)
