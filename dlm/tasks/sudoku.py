"""Sudoku: full grids, puzzles with a unique solution, a checker, and the token encoding.

A grid of size n (9: 3 x 3 boxes; 6: boxes of 2 rows x 3 columns) is n * n cells in row-major
order. Cells are their own vocabulary: digit d in 1..n is token d - 1 (the model's mask is id
n, after the last digit). A puzzle is a grid with the non-givens set to 0 (blank).

- `full_grid(rng)`: a uniformly shuffled solution by randomized backtracking over bitmasks
  (most-constrained cell first);
- `dig(grid, rng, givens)`: removes givens in random order while the puzzle keeps exactly one
  solution (checked by `count_solutions(.., limit=2)`), down to `givens` or, with givens=0, until
  no given can go (a minimal puzzle);
- `augment(grid, rng)`: a random symmetry of the grid (digit relabelling, row permutations within
  bands, band permutations, the same for columns, transposition for square boxes); validity,
  uniqueness and difficulty are preserved, so a few base grids give endless training grids;
- `check(solution, puzzle)`: a valid grid that keeps every given.
Grids and puzzles are cached on disk by (size, seed, count, givens) (`cached`).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """An n x n grid of boxes box_rows x box_cols."""

    size: int

    def __post_init__(self):
        if self.size not in (4, 6, 9):
            raise ValueError(f"Sudoku size {self.size} is not supported; use 4, 6 or 9.")

    @property
    def box_rows(self) -> int:
        return {4: 2, 6: 2, 9: 3}[self.size]

    @property
    def box_cols(self) -> int:
        return self.size // self.box_rows

    @property
    def cells(self) -> int:
        return self.size * self.size

    @property
    def full(self) -> int:
        return (1 << self.size) - 1

    def box_of(self, r, c):
        return (r // self.box_rows) * (self.size // self.box_cols) + c // self.box_cols

    @property
    def units(self) -> np.ndarray:
        """[3n, n] cell indices of every row, column and box."""
        n, idx = self.size, np.arange(self.cells).reshape(self.size, self.size)
        boxes = [idx[r:r + self.box_rows, c:c + self.box_cols].ravel()
                 for r in range(0, n, self.box_rows) for c in range(0, n, self.box_cols)]
        return np.concatenate([idx, idx.T, np.array(boxes)])


def _solve(geo: Geometry, cells: list[int], rng, limit: int, out: list) -> int:
    """Backtracking over bitmasks on a flat list of digits (0 = blank). Fills `out` with the first
    solution; returns the number of solutions found, at most `limit`. rng None: digits in order."""
    n = geo.size
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    blanks = []
    for i, d in enumerate(cells):
        r, c = divmod(i, n)
        if d:
            bit = 1 << (d - 1)
            b = geo.box_of(r, c)
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            blanks.append((i, r, c, geo.box_of(r, c)))
    grid = list(cells)
    found = 0

    def search(todo) -> bool:
        nonlocal found
        if not todo:
            found += 1
            if found == 1:
                out[:] = grid
            return found >= limit
        best, best_free, best_n = None, 0, n + 1
        for j, (i, r, c, b) in enumerate(todo):  # most constrained cell first
            free = geo.full & ~(rows[r] | cols[c] | boxes[b])
            k = bin(free).count("1")
            if k < best_n:
                best, best_free, best_n = j, free, k
                if k <= 1:
                    break
        if best_n == 0:
            return False
        i, r, c, b = todo[best]
        rest = todo[:best] + todo[best + 1:]
        digits = [d for d in range(n) if best_free >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = d + 1
            stop = search(rest)
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            grid[i] = 0
            if stop:
                return True
        return False

    search(blanks)
    return found


def full_grid(geo: Geometry, rng: np.random.Generator) -> np.ndarray:
    """A random solved grid [n, n] of digits 1..n."""
    out = []
    _solve(geo, [0] * geo.cells, rng, 1, out)
    return np.asarray(out, np.int8).reshape(geo.size, geo.size)


def count_solutions(geo: Geometry, puzzle: np.ndarray, limit: int = 2) -> int:
    """Solutions of a puzzle (0 = blank), counted up to `limit`."""
    return _solve(geo, [int(d) for d in np.asarray(puzzle).ravel()], None, limit, [])


def solve(geo: Geometry, puzzle: np.ndarray) -> np.ndarray | None:
    out = []
    return np.asarray(out, np.int8).reshape(geo.size, geo.size) if _solve(geo, [int(d) for d in np.asarray(puzzle).ravel()],
                                                                         None, 1, out) else None


def dig(geo: Geometry, grid: np.ndarray, rng: np.random.Generator, givens: int = 0) -> np.ndarray:
    """A puzzle with a unique solution (`grid`): givens removed in random order while unique, until
    `givens` remain (0: until none can be removed, a minimal puzzle)."""
    puzzle = np.array(grid, np.int8).ravel()
    left = geo.cells
    for i in rng.permutation(geo.cells):
        if left <= givens:
            break
        keep, puzzle[i] = puzzle[i], 0
        if count_solutions(geo, puzzle, 2) == 1:
            left -= 1
        else:
            puzzle[i] = keep
    return puzzle.reshape(geo.size, geo.size)


def augment(geo: Geometry, grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random symmetry of a grid (works on puzzles too: 0 stays 0)."""
    n, br, bc = geo.size, geo.box_rows, geo.box_cols
    relabel = np.concatenate([[0], rng.permutation(n) + 1]).astype(np.int8)
    rows = np.concatenate([band * br + rng.permutation(br) for band in rng.permutation(n // br)])
    cols = np.concatenate([stack * bc + rng.permutation(bc) for stack in rng.permutation(n // bc)])
    out = relabel[np.asarray(grid)][rows][:, cols]
    if br == bc and rng.random() < 0.5:
        out = out.T
    return out


def check(geo: Geometry, solution: np.ndarray, puzzle: np.ndarray) -> bool:
    """True when `solution` is a valid full grid that keeps every given of `puzzle`."""
    s, p = np.asarray(solution).ravel(), np.asarray(puzzle).ravel()
    if s.shape != (geo.cells,) or ((p != 0) & (s != p)).any():
        return False
    units = s[geo.units]
    return bool((np.sort(units, axis=1) == np.arange(1, geo.size + 1)).all())


def encode(grid: np.ndarray, mask_id: int) -> np.ndarray:
    """Digits 1..n -> tokens 0..n-1, blanks (0) -> mask_id; [..., n, n] -> [..., n * n] int32."""
    g = np.asarray(grid)
    flat = g.reshape(*g.shape[:-2], -1).astype(np.int32)
    return np.where(flat == 0, mask_id, flat - 1)


def encode_pair(geo: Geometry, grid: np.ndarray, rng: np.random.Generator, blank_id: int,
                keep: tuple[float, float] = (0.2, 0.6)) -> np.ndarray:
    """A prompt/response row [2 n * n] (data.format=pairs): a puzzle of random givens (each cell kept
    with a probability drawn from U(keep); blanks are `blank_id`, a token of their own), then the
    grid. The givens need not fix a unique solution: the response is the grid they came from."""
    kept = rng.random(geo.cells) < rng.uniform(*keep)
    return prompt_pair(np.where(kept.reshape(geo.size, geo.size), grid, 0), blank_id, grid)


def prompt_pair(puzzle: np.ndarray, blank_id: int, grid: np.ndarray | None = None) -> np.ndarray:
    """[..., 2 n * n]: the puzzle (blanks -> `blank_id`) then the grid's tokens (or `blank_id + 1`,
    the mask of a pairs model, where no grid is given: the part a decoder fills)."""
    prompt = encode(puzzle, blank_id)
    response = encode(grid, blank_id) if grid is not None else np.full_like(prompt, blank_id + 1)
    return np.concatenate([prompt, response], axis=-1)


def decode(tokens: np.ndarray, size: int) -> np.ndarray:
    """Tokens 0..n-1 -> digits 1..n (anything else, e.g. a mask, -> 0); [..., n * n] -> [..., n, n]."""
    t = np.asarray(tokens)
    d = np.where((t >= 0) & (t < size), t + 1, 0).astype(np.int8)
    return d.reshape(*t.shape[:-1], size, size)


def generate_set(geo: Geometry, seed: int, count: int, givens: int = 0, progress: bool = False):
    """(puzzles, solutions) [count, n, n] int8: each from a fresh random grid dug to `givens`."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    puzzles, solutions = [], []
    for _ in tqdm(range(count), disable=not progress, desc=f"sudoku {geo.size}x{geo.size} puzzles", leave=False):
        grid = full_grid(geo, rng)
        puzzles.append(dig(geo, grid, rng, givens))
        solutions.append(grid)
    return np.stack(puzzles), np.stack(solutions)


def cached(geo: Geometry, seed: int, count: int, givens: int, cache_dir: str | pathlib.Path | None, progress: bool = True):
    """generate_set, stored as <cache_dir>/sudoku<n>_seed<s>_n<count>_g<givens>.npz and read back."""
    if cache_dir is None:
        return generate_set(geo, seed, count, givens, progress)
    path = pathlib.Path(cache_dir) / f"sudoku{geo.size}_seed{seed}_n{count}_g{givens}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["puzzles"], f["solutions"]
    puzzles, solutions = generate_set(geo, seed, count, givens, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, puzzles=puzzles, solutions=solutions)
    tmp.rename(path)
    return puzzles, solutions


def cached_grids(geo: Geometry, seed: int, count: int, cache_dir: str | pathlib.Path | None) -> np.ndarray:
    """`count` random solved grids [count, n, n] of a seed, stored as <cache_dir>/sudoku<n>_grids_seed<s>_n<count>.npy."""
    def make():
        rng = np.random.default_rng(seed)
        return np.stack([full_grid(geo, rng) for _ in range(count)])

    if cache_dir is None:
        return make()
    path = pathlib.Path(cache_dir) / f"sudoku{geo.size}_grids_seed{seed}_n{count}.npy"
    if path.exists():
        return np.load(path)
    grids = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, grids)
    tmp.rename(path)
    return grids
