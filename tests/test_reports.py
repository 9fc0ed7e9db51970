"""medllava.reports.markdown_table: the one table helper."""

import pytest

from medllava.reports import markdown_table


def test_markdown_table_plain_and_padded():
    assert markdown_table(["a", "bb"], [[1, "x"], ["long", 2.5]]) == (
        "| a | bb |\n|---|---|\n| 1 | x |\n| long | 2.5 |"
    )
    assert markdown_table(["a", "bb"], [[1, "x"], ["long", 2.5]], pad=True) == (
        "| a    | bb  |\n|------|-----|\n| 1    | x   |\n| long | 2.5 |"
    )


def test_cells_cannot_break_the_table():
    assert markdown_table(["q"], [["left|right\nlung"]]).splitlines()[-1] == "| left\\|right lung |"
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header has 2"):
        markdown_table(["a", "b"], [["only one"]])
