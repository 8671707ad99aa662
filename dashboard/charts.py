"""Vega-Lite specs of the dashboard's charts, drawn in the browser (zoom, pan, tooltips).

Plain dicts for ``st.vega_lite_chart(rows, spec)`` rather than Altair objects: building and validating
one Altair chart took 0.08–0.13 s on this machine under load, the Experts page draws one per layer plus
four curves (half its script time), and importing Altair cost 0.6–1.7 s of a cold start
(benchmarks/RESULTS.md, "Dashboard render time"). The specs are what the Altair charts compiled to; the
rows go to Streamlit separately, which sends them as Arrow.
"""

from __future__ import annotations


def _q(field: str, **extra) -> dict:
    return {"field": field, "type": "quantitative", **extra}


def _n(field: str, **extra) -> dict:
    return {"field": field, "type": "nominal", **extra}


def curves(rows: list[dict], title: str, color: str = "metric", y: str = "value", dash: str | None = None) -> dict:
    """Lines of ``y`` over ``step``, one per ``color`` value (and dash pattern per ``dash`` value);
    scroll to zoom, drag to pan."""
    encoding = {"x": _q("step"), "y": _q(y, scale={"zero": False}), "color": _n(color),
                "tooltip": [_q("step"), _n(color), *([_n(dash)] if dash else []), _q(y)]}
    if dash:
        encoding["strokeDash"] = _n(dash)
    return {"title": title, "mark": {"type": "line", "point": len(rows) < 60}, "encoding": encoding,
            "params": [{"name": "zoom", "select": {"type": "interval", "encodings": ["x", "y"]}, "bind": "scales"}]}


def heatmap(rows: list[dict], title: str) -> dict:
    """step × expert load relative to a fair share, diverging around 1 (balanced), clipped at 2."""
    # a band per expert (a fixed pixel height would include the axes and squeeze out the cells)
    band = max(4, min(16, 480 // max(1, len({r["expert"] for r in rows}))))
    ordinal = {"type": "ordinal"}
    return {"title": title, "height": {"step": band}, "mark": {"type": "rect"},
            "encoding": {
                "x": {"field": "step", **ordinal, "title": "step (end of log window)", "axis": {"labelOverlap": True}},
                "y": {"field": "expert", **ordinal, "title": "expert"},
                "color": _q("relative_load", title="load / fair share",
                            scale={"scheme": "redblue", "reverse": True, "domain": [0, 2], "domainMid": 1,
                                   "clamp": True}),
                "tooltip": [{"field": "step", **ordinal}, {"field": "expert", **ordinal},
                            _q("relative_load", format=".2f")]}}


def bars(rows: list[dict], x: str, y: str, title: str, color: str | None = None) -> dict:
    encoding = {"x": _q(x), "y": _n(y, sort=None), "tooltip": [{"field": k} for k in (rows[0] if rows else [])]}
    if color:
        encoding["color"] = _n(color)
    return {"title": title, "mark": {"type": "bar"}, "encoding": encoding}
