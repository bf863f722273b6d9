"""Sudoku: generated puzzles have exactly one solution (by an independent brute-force counter), the
checker rejects every corruption, symmetries keep grids valid."""

import itertools

import numpy as np
import pytest

from dlm.tasks import sudoku

GEOS = {n: sudoku.Geometry(n) for n in (4, 6, 9)}


def brute_count(geo, puzzle, limit=3):
    """Solutions counted by plain row-major backtracking with set lookups (no bitmasks, no ordering)."""
    n = geo.size
    g = [list(map(int, row)) for row in np.asarray(puzzle)]

    def ok(r, c, d):
        if d in g[r] or any(g[i][c] == d for i in range(n)):
            return False
        r0, c0 = r - r % geo.box_rows, c - c % geo.box_cols
        return all(g[i][j] != d for i in range(r0, r0 + geo.box_rows) for j in range(c0, c0 + geo.box_cols))

    def go(k):
        if k == n * n:
            return 1
        r, c = divmod(k, n)
        if g[r][c]:
            return go(k + 1)
        total = 0
        for d in range(1, n + 1):
            if ok(r, c, d):
                g[r][c] = d
                total += go(k + 1)
                g[r][c] = 0
                if total >= limit:
                    break
        return total

    return go(0)


def test_all_4x4_grids_are_counted_and_generated():
    geo = GEOS[4]
    assert brute_count(geo, np.zeros((4, 4), int), limit=10**6) == 288  # the known number of 4x4 Sudoku grids
    assert sudoku.count_solutions(geo, np.zeros((4, 4), int), limit=10**6) == 288
    rng = np.random.default_rng(0)
    seen = {sudoku.full_grid(geo, rng).tobytes() for _ in range(3000)}
    assert len(seen) == 288  # the generator reaches every grid


@pytest.mark.parametrize("n,givens,count", [(6, 0, 12), (9, 30, 4)])
def test_generated_puzzles_have_exactly_one_solution(n, givens, count):
    geo = GEOS[n]
    puzzles, solutions = sudoku.generate_set(geo, seed=11, count=count, givens=givens)
    for p, s in zip(puzzles, solutions):
        assert sudoku.check(geo, s, p)
        assert brute_count(geo, p) == 1
        if givens:
            assert (p != 0).sum() == givens
        else:  # minimal: removing any given makes the solution ambiguous
            for i in zip(*np.nonzero(p)):
                q = p.copy()
                q[i] = 0
                assert brute_count(geo, q, limit=2) >= 2
    np.testing.assert_array_equal(sudoku.generate_set(geo, seed=11, count=count, givens=givens)[0], puzzles)


@pytest.mark.parametrize("n", [6, 9])
def test_checker_rejects_every_single_cell_corruption(n):
    geo = GEOS[n]
    grid = sudoku.full_grid(geo, np.random.default_rng(n))
    puzzle = sudoku.dig(geo, grid, np.random.default_rng(1), givens=geo.cells // 2)
    assert sudoku.check(geo, grid, puzzle) and sudoku.check(geo, grid, np.zeros_like(grid))
    for r, c in itertools.product(range(n), repeat=2):
        for d in range(1, n + 1):
            if d != grid[r, c]:
                bad = grid.copy()
                bad[r, c] = d
                assert not sudoku.check(geo, bad, np.zeros_like(grid)), (r, c, d)
    other = sudoku.augment(geo, grid, np.random.default_rng(3))
    assert sudoku.check(geo, other, np.zeros_like(grid)) and not sudoku.check(geo, other, puzzle)


def test_symmetries_keep_validity_and_unique_solutions():
    geo = GEOS[9]
    rng = np.random.default_rng(5)
    puzzles, solutions = sudoku.generate_set(geo, seed=3, count=2, givens=30)
    for p, s in zip(puzzles, solutions):
        for _ in range(5):
            seed = int(rng.integers(1 << 30))
            q, t = sudoku.augment(geo, p, np.random.default_rng(seed)), sudoku.augment(geo, s, np.random.default_rng(seed))
            assert sudoku.check(geo, t, q) and sudoku.count_solutions(geo, q) == 1 and (q != 0).sum() == 30


def test_encoding_round_trips():
    geo = GEOS[6]
    grid = sudoku.full_grid(geo, np.random.default_rng(0))
    puzzle = sudoku.dig(geo, grid, np.random.default_rng(0))
    tokens = sudoku.encode(puzzle, mask_id=6)
    assert tokens.shape == (36,) and set(np.unique(tokens)) <= set(range(7)) and (tokens == 6).sum() == (puzzle == 0).sum()
    np.testing.assert_array_equal(sudoku.decode(tokens, 6), puzzle)
    np.testing.assert_array_equal(sudoku.decode(sudoku.encode(grid, 6), 6), grid)


def test_pairs_rows_are_a_puzzle_of_the_grid_then_the_grid():
    geo = GEOS[6]
    rng = np.random.default_rng(3)
    grid = sudoku.full_grid(geo, rng)
    rows = np.stack([sudoku.encode_pair(geo, grid, rng, blank_id=6) for _ in range(50)])
    prompt, response = rows[:, :36], rows[:, 36:]
    assert (response == sudoku.encode(grid, 6)).all()
    kept = prompt != 6
    assert (prompt[kept] == np.broadcast_to(sudoku.encode(grid, 6), prompt.shape)[kept]).all()
    frac = kept.mean(1)
    assert 0.05 < frac.min() and frac.max() < 0.8 and frac.std() > 0.05  # the share kept varies from row to row
    spec = sudoku.prompt_pair(np.where(kept[0].reshape(6, 6), grid, 0), blank_id=6)
    assert (spec[:36] == prompt[0]).all() and (spec[36:] == 7).all()  # the response to fill is the pairs model's mask


def brute_sum(a_digits, b_digits):
    """a + b through Python integers (digits least significant first)."""
    value = lambda d: int("".join(map(str, d[::-1])))
    return value(a_digits) + value(b_digits)


def test_addition_rows_hold_the_sum_and_the_checker_rejects_every_single_digit_corruption():
    from dlm.tasks import addition

    layout = addition.Layout(6)
    a, b = addition.problems(layout, 200, np.random.default_rng(0))
    rows = addition.rows(a, b)
    assert rows.shape == (200, 21)
    for r, x, y in zip(rows, a, b):
        assert int("".join(map(str, r[14:][::-1]))) == brute_sum(x, y)
    assert addition.check(rows, a, b).all()
    for pos in range(14, 21):
        for d in range(1, 10):
            bad = rows.copy()
            bad[:, pos] = (bad[:, pos] + d) % 10
            assert not addition.check(bad, a, b).any()


def test_long_carry_problems_ripple_through_n_minus_1_columns():
    from dlm.tasks import addition

    layout = addition.Layout(8)
    a, b = addition.long_carry(layout, 500, np.random.default_rng(1))
    assert (addition.carry_run(a, b) >= 7).all()
    rows = addition.rows(a, b)
    assert all(int("".join(map(str, r[18:][::-1]))) == brute_sum(x, y) for r, x, y in zip(rows, a, b))
    u, v = addition.problems(layout, 500, np.random.default_rng(1))
    assert (addition.carry_run(u, v) >= 7).mean() < 0.05  # uniform operands rarely carry that far


def test_a_6x6_model_solves_more_puzzles_in_margin_order_than_in_random_order(root, tmp_path):
    """The quality check of the decoders, at a fixed number of steps and seed (configs/sudoku6.yaml:
    300 steps, here at batch 32): on 100 held-out minimal puzzles, one cell per step by top margin solves at least
    30 points more than the exact ancestral sampler's random order (Kim et al.: order matters)."""
    import dlm
    from dlm.config import DecodeConfig, SamplingConfig, Sampler, load_config
    from dlm.eval.tasks import solve_sudoku
    from dlm.train.trainer import train

    cfg = load_config(root / "configs/sudoku6.yaml", [f"workdir={tmp_path}/run", f"data.sudoku.cache_dir={tmp_path}/cache",
                                                      "train.progress=false", "train.batch_size=32", "train.eval_windows=64"])
    train(cfg)
    model, cfg = dlm.restore(cfg.workdir)
    puzzles, solutions = sudoku.generate_set(GEOS[6], 424_242, 100, givens=0)
    rates = {}
    for name, sampler, decode in [("margin", Sampler.PARALLEL, DecodeConfig(block_length=36, rule="topk", k=1, score="margin")),
                                  ("random", Sampler.ANCESTRAL, DecodeConfig(block_length=36))]:
        sampling = SamplingConfig(sampler=sampler, temperature=0.0, steps=36, float64=False, decode=decode)
        rates[name] = solve_sudoku(model, cfg.diffusion, puzzles, solutions, sampling)["exact_solve"]
    assert rates["margin"] - rates["random"] >= 0.30, rates


def test_every_batch_of_the_harness_draws_its_own_noise(root):
    """The same puzzle in two batches of the harness gets different draws at temperature 1 (one
    seed for every batch made the batches' draws identical, so the rows were not independent)."""
    import dataclasses

    import dlm
    from dlm.config import load_config
    from dlm.eval.tasks import decode_all

    cfg = load_config(root / "configs/test.yaml", ["sampling.steps=4"])
    model = dlm.build_model(cfg)
    spec = np.full((2, 32), model.mask_id, np.int32)
    spec[:, :4] = [5, 6, 7, 8]
    tokens, _, _ = decode_all(model, cfg.diffusion, spec, dataclasses.replace(cfg.sampling, temperature=1.0), batch=1)
    assert (tokens[:, :4] == [5, 6, 7, 8]).all()
    assert not np.array_equal(tokens[0], tokens[1])
