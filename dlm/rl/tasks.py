"""Prompts and rewards of the tasks with a checker, for post-training from rewards.

A task gives, for a step, `prompts(step, count)`: the canvas of each prompt (the response
positions hold the model's mask), which positions are given, and what its checker needs; and
`rewards(tokens, prompts)`: per rollout, `exact` (1 when the checker accepts the answer) and
`cells` (the share of response cells or digits that are right). The prompts of a step are a
function of (seed, step) alone, so a resumed run sees the prompts an uninterrupted one would,
and they come from seeds that neither the training data, its validation split nor the
held-out evaluation sets of benchmarks/tasks.py use (those are seed, seed + 1_000_003 and
seed + 2_000_003 + tier).

- Sudoku: one pool of `rl.pool` puzzles with a unique solution per entry of `rl.givens` (0:
  minimal puzzles), generated once and cached; a prompt is a random symmetry of a puzzle of a
  random pool. The model fills the blanks in place (a model of solved grids) or after the
  puzzle (data.format=pairs).
- Addition: operands drawn fresh every step, a share `rl.long_carry` of them with a carry that
  ripples through at least digits - 1 columns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dlm.config import Config, DataFormat, Source
from dlm.tasks import addition, sudoku

RL_SEED = 3_000_017  # added to the task's seed: the prompts' own seeds


@dataclasses.dataclass
class Prompts:
    canvas: np.ndarray  # [P, L] int32: the prompt's tokens, the model's mask at the response positions
    given: np.ndarray  # [P, L] bool: the prompt's positions
    answers: dict  # what the checker reads, one row per prompt


class SudokuTask:
    def __init__(self, cfg: Config, mask_id: int):
        sc = cfg.data.sudoku
        self.geo = sudoku.Geometry(sc.size)
        self.pairs = cfg.data.format == DataFormat.PAIRS
        self.mask_id, self.seed = mask_id, sc.seed + RL_SEED
        self.pools = [sudoku.cached(self.geo, self.seed + i, cfg.rl.pool, g, sc.cache_dir, progress=False)
                      for i, g in enumerate(cfg.rl.givens)]

    @property
    def prompt_len(self) -> int:
        """The prefix every canvas gives: the puzzle for a pairs model, none for infill."""
        return self.geo.cells if self.pairs else 0

    def prompts(self, step: int, count: int) -> Prompts:
        rng = np.random.default_rng([self.seed, step])
        puzzles, solutions = [], []
        for _ in range(count):
            pz, sol = self.pools[rng.integers(len(self.pools))]
            i, s = rng.integers(len(pz)), int(rng.integers(2**62))
            puzzles.append(sudoku.augment(self.geo, pz[i], np.random.default_rng(s)))  # the same symmetry of both
            solutions.append(sudoku.augment(self.geo, sol[i], np.random.default_rng(s)))
        puzzles, solutions = np.stack(puzzles), np.stack(solutions)
        if self.pairs:
            canvas = sudoku.prompt_pair(puzzles, blank_id=self.geo.size)
            given = np.zeros(canvas.shape, bool)
            given[:, : self.geo.cells] = True
        else:
            canvas = sudoku.encode(puzzles, self.mask_id)
            given = canvas != self.mask_id
        return Prompts(canvas.astype(np.int32), given, {"puzzles": puzzles, "solutions": solutions})

    def rewards(self, tokens: np.ndarray, prompts: Prompts) -> dict:
        grids = sudoku.decode(np.asarray(tokens)[:, -self.geo.cells:], self.geo.size)
        puzzles, solutions = prompts.answers["puzzles"], prompts.answers["solutions"]
        exact = np.array([sudoku.check(self.geo, g, p) for g, p in zip(grids, puzzles)], np.float32)
        holes = puzzles == 0
        cells = ((grids == solutions) & holes).sum((1, 2)) / np.maximum(holes.sum((1, 2)), 1)
        return {"exact": exact, "cells": cells.astype(np.float32)}


class AdditionTask:
    def __init__(self, cfg: Config, mask_id: int):
        self.layout = addition.Layout(cfg.data.addition.digits)
        self.mask_id, self.seed, self.long_carry = mask_id, cfg.data.addition.seed + RL_SEED, cfg.rl.long_carry

    @property
    def prompt_len(self) -> int:
        return self.layout.prompt_length

    def prompts(self, step: int, count: int) -> Prompts:
        rng = np.random.default_rng([self.seed, step])
        a, b = addition.problems(self.layout, count, rng)
        la, lb = addition.long_carry(self.layout, count, rng)
        hard = rng.random(count) < self.long_carry
        a, b = np.where(hard[:, None], la, a), np.where(hard[:, None], lb, b)
        canvas = addition.rows(a, b)
        canvas[:, self.prompt_len:] = self.mask_id
        given = np.zeros(canvas.shape, bool)
        given[:, : self.prompt_len] = True
        return Prompts(canvas.astype(np.int32), given, {"a": a, "b": b})

    def rewards(self, tokens: np.ndarray, prompts: Prompts) -> dict:
        right = addition.sums(tokens, self.layout) == addition.add(prompts.answers["a"], prompts.answers["b"])
        return {"exact": right.all(1).astype(np.float32), "cells": right.mean(1).astype(np.float32)}


def task_for(cfg: Config, mask_id: int):
    """The task of a config's data section (dlm.config.check_rl allows sudoku and addition)."""
    return SudokuTask(cfg, mask_id) if cfg.data.source == Source.SUDOKU else AdditionTask(cfg, mask_id)


def repeat(prompts: Prompts, group_size: int) -> Prompts:
    """Each prompt G times in a row: the rollouts of a group are consecutive."""
    rep = lambda a: np.repeat(a, group_size, axis=0)
    return Prompts(rep(prompts.canvas), rep(prompts.given), {k: rep(v) for k, v in prompts.answers.items()})
