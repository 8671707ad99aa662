"""Altair charts of the dashboard (Vega-Lite in the browser: zoom, pan, tooltips)."""

from __future__ import annotations

import altair as alt
import pandas as pd


def curves(rows: list[dict], title: str, color: str = "metric", y: str = "value") -> alt.Chart:
    """Lines of ``y`` over ``step``, one per ``color`` value; scroll to zoom, drag to pan."""
    return (alt.Chart(pd.DataFrame(rows), title=title).mark_line(point=len(rows) < 60)
            .encode(x=alt.X("step:Q"), y=alt.Y(f"{y}:Q", scale=alt.Scale(zero=False)),
                    color=alt.Color(f"{color}:N"), tooltip=["step:Q", f"{color}:N", f"{y}:Q"])
            .interactive())


def heatmap(rows: list[dict], title: str, height=None) -> alt.Chart:
    """step × expert load relative to a fair share, diverging around 1 (balanced), clipped at 2."""
    # a band per expert (a fixed pixel height would include the axes and squeeze out the cells)
    height = height or alt.Step(max(4, min(16, 480 // max(1, len({r["expert"] for r in rows})))))
    return (alt.Chart(pd.DataFrame(rows), title=title, height=height).mark_rect()
            .encode(x=alt.X("step:O", title="step (end of log window)", axis=alt.Axis(labelOverlap=True)),
                    y=alt.Y("expert:O", title="expert"),
                    color=alt.Color("relative_load:Q", title="load / fair share",
                                    scale=alt.Scale(scheme="redblue", reverse=True, domain=[0, 2], domainMid=1,
                                                    clamp=True)),
                    tooltip=["step:O", "expert:O", alt.Tooltip("relative_load:Q", format=".2f")]))


def bars(rows: list[dict], x: str, y: str, title: str, color: str | None = None) -> alt.Chart:
    enc = {"x": alt.X(f"{x}:Q"), "y": alt.Y(f"{y}:N", sort=None), "tooltip": list(rows[0]) if rows else []}
    if color:
        enc["color"] = alt.Color(f"{color}:N")
    return alt.Chart(pd.DataFrame(rows), title=title).mark_bar().encode(**enc)
