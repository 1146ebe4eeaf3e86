"""Building blocks of fedgt's HTML pages: escaping, number formats, tables and plots embedded as PNG data."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}.bad{color:#a00}
details{margin:.3em 0}code{font-size:90%}img{display:block;margin:.5em 0 1.5em}.note{color:#555}"""


class Raw(str):
    """Cell content that is already HTML."""


def esc(x) -> str:
    """``x`` as escaped HTML text."""
    return html.escape(str(x))


def fmt(x, pct: bool = False) -> str:
    """A number for a table cell: 4 significant digits, or a percentage; "-" where missing or not finite."""
    if x is None or isinstance(x, float) and not math.isfinite(x):
        return "-"
    if not isinstance(x, int | float) or isinstance(x, bool):
        return str(x)
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def table(head: list[str], body: list[list], num: set[int] = frozenset(), id: str = "") -> str:
    """An HTML table; cells are escaped unless they are ``Raw``; columns in ``num`` are right-aligned."""
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    lines = "".join("<tr>" + "".join(f"<td{' class=num' if i in num else ''}>{c if isinstance(c, Raw) else esc(c)}"
                                     "</td>" for i, c in enumerate(r)) + "</tr>" for r in body)
    return f"<table{f' id={id}' if id else ''}><tr>{cells}</tr>{lines}</table>"


def png_img(draw: Callable, alt: str, id: str, size: tuple[float, float] = (6.4, 3.4)) -> str:
    """An ``<img>`` holding the PNG that ``draw(ax)`` plots (matplotlib, embedded as data: no file, no network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img id="{esc(id)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, body: list[str]) -> str:
    """A whole self-contained HTML document."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")
