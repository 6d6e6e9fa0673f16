"""How the study's tables are shown to people: p-values and tables in markdown and HTML.

Shared by the voxel metrics (Table 3), the demographics (Table 1) and the reader study (Table 5), so that a
p-value reads the same in every table. Depends on nothing else in the package: any part may use it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

import numpy as np


def format_p(p: float) -> str:
    """APA-like p-value: ``p<.001``, ``p>.99``, else two decimals (three below .01 or near .05), half-up."""
    if p is None or not np.isfinite(p):
        return "n/a"
    if p < 0.001:
        return "p<.001"
    if p > 0.99:
        return "p>.99"
    digits = 3 if (p < 0.01 or 0.045 <= p < 0.055) else 2
    # Half-up, as tables are usually rounded (0.125 -> .13), not Python's half-to-even on binary floats.
    rounded = Decimal(repr(float(p))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return "p=" + str(rounded).lstrip("0")


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A markdown table of strings (header row, separator, one line per row), without a final newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def html_table(
    header: Sequence[str], body: Sequence[Sequence[str]], *, css_class: str, caption: str
) -> str:
    """A standalone HTML table of strings (escaped), followed by its caption as a paragraph."""
    out = [f"<table class='{css_class}'>", "<thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    out.append(f"<p>{html.escape(caption)}</p>")
    return "\n".join(out) + "\n"
