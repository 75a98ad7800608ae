"""RL micro-batch planning details that need no model: the packed row length."""

from prism_megatron.rl.batch import fit_rows


def test_packed_rows_are_as_short_as_the_budgets_row_count_allows():
    # Budget 64: FFD needs 2 rows ([30, 20, 10], [5]) -> 128 positions for 65 tokens. 40 is the
    # shortest multiple of 8 that still packs into 2 rows ([30, 10], [20, 5]); 32 needs 3.
    assert fit_rows([[30, 20, 10, 5]], longest=32, budget=64) == (40, [[[0, 2], [1, 3]]])
    # Every rank's share must fit in the common row count: rank 1's [24, 24] needs 48 for one row.
    assert fit_rows([[24, 8], [24, 24]], longest=24, budget=64) == (48, [[[0, 1]], [[0, 1]]])
    # Nothing shorter than the longest sequence; an empty share has no rows.
    assert fit_rows([[16], []], longest=16, budget=64) == (16, [[[0]], []])
