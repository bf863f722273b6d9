"""Multi-digit addition: a task whose natural order is left to right.

A problem is two uniform n-digit operands a and b (leading zeros allowed). Its row is three rows
of n + 1 digits, each written least significant digit first: a (with a 0 as its top digit), b
(the same), then the sum a + b (n + 1 digits). Token d is digit d; the model's mask is id 10.
The operands are the prompt (2 (n + 1) positions, never masked under data.format=pairs), the
sum is the response.

Written least significant first, sum digit i is (a_i + b_i + c_i) mod 10, and the carry c_i is
fixed by column i - 1 and sum digit i - 1: c_i = [a_{i-1} + b_{i-1} + c_{i-1} >= 10] with
c_{i-1} = (s_{i-1} - a_{i-1} - b_{i-1}) mod 10. So a model decoding left to right (the
autoregressive hyperschedule) only ever needs its own column and the digit before; a decoder
that fills a digit before those to its left has to resolve the carry chain in one pass. That
makes order matter the other way round from Sudoku, where the best order is data-dependent.

- `problems(layout, count, rng)`: uniform operands;
- `long_carry(layout, count, rng)`: operands whose carry ripples through at least n - 1 columns
  (a_0 + b_0 >= 10, then columns summing to 9), the hard tier;
- `rows(a, b)`: the token rows; `check(rows, a, b)`: whether each row's sum is a + b.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ALPHABET = "0123456789"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Rows of `digits` + 1 positions: operand a, operand b, then the sum."""

    digits: int

    @property
    def width(self) -> int:
        return self.digits + 1

    @property
    def length(self) -> int:
        return 3 * self.width

    @property
    def prompt_length(self) -> int:
        return 2 * self.width


def problems(layout: Layout, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): [count, digits] uniform digits, least significant first."""
    return (rng.integers(0, 10, (count, layout.digits)), rng.integers(0, 10, (count, layout.digits)))


def long_carry(layout: Layout, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) whose carry runs from column 0 through at least digits - 1 columns: a_0 + b_0 >= 10,
    then every column up to a random end in [digits - 1, digits] sums to 9 (the carry ripples
    through each), the rest uniform."""
    n = layout.digits
    a, b = problems(layout, count, rng)
    a[:, 0] = rng.integers(1, 10, count)
    b[:, 0] = 10 - a[:, 0] + rng.integers(0, a[:, 0])  # b_0 in [10 - a_0, 9]
    end = rng.integers(n - 1, n + 1, count)  # columns 1 .. end - 1 sum to 9
    for i in range(1, n):
        ripple = i < end
        ai = rng.integers(0, 10, count)
        a[:, i] = np.where(ripple, ai, a[:, i])
        b[:, i] = np.where(ripple, 9 - ai, b[:, i])
    return a, b


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Digits of a + b, least significant first: [count, digits + 1]."""
    count, n = a.shape
    out = np.zeros((count, n + 1), np.int64)
    carry = np.zeros(count, np.int64)
    for i in range(n):
        s = a[:, i] + b[:, i] + carry
        out[:, i], carry = s % 10, s // 10
    out[:, n] = carry
    return out


def carry_run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the longest run of consecutive columns that emit a carry, per problem."""
    count, n = a.shape
    carry = np.zeros(count, np.int64)
    run = best = np.zeros(count, np.int64)
    for i in range(n):
        carry = (a[:, i] + b[:, i] + carry) // 10
        run = np.where(carry > 0, run + 1, 0)
        best = np.maximum(best, run)
    return best


def rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Token rows [count, 3 (digits + 1)]: a, b (each with a 0 top digit), a + b."""
    pad = np.zeros((len(a), 1), np.int64)
    return np.concatenate([a, pad, b, pad, add(a, b)], axis=1).astype(np.int32)


def sums(tokens: np.ndarray, layout: Layout) -> np.ndarray:
    """The response part (sum digits) of rows [count, length]."""
    return np.asarray(tokens)[:, layout.prompt_length:]


def check(tokens: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bool [count]: the row's sum digits are exactly those of a + b."""
    layout = Layout(a.shape[1])
    return (sums(tokens, layout) == add(a, b)).all(axis=1)
