"""Value shaping shared by both trackers: params flattened to strings, metrics to floats, tables to columns.

Both trackers run the same checks, so a value the MLflow server would reject fails the same
way in a unit test on the no-op tracker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

MAX_PARAM_LEN = 6000  # MLflow rejects longer param values


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; other values become strings (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str, sort_keys=True)
        else:
            text = str(value)
        flat[name] = text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."
    return flat


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Floats for every metric (numpy/torch scalars and bools included); a clear error otherwise."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from exc
    return out


def table_columns(rows: list[dict] | Mapping[str, list]) -> dict[str, list]:
    """A table as a dict of equal-length columns; rows (list of dicts) may miss keys (None)."""
    if isinstance(rows, Mapping):
        columns = {str(k): list(v) for k, v in rows.items()}
    else:
        rows = list(rows)
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("log_table rows must be dicts (or pass a dict of columns)")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        columns = {str(k): [r.get(k) for r in rows] for k in keys}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"log_table columns have different lengths: {lengths}")
    # nested values would make pandas build object columns MLflow cannot render
    return {k: [json.dumps(x, default=str) if isinstance(x, (dict, list)) else x for x in v] for k, v in columns.items()}
