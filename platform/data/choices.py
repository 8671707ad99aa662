"""Names a config must pick from a fixed set (PII kinds, domain labels, perplexity buckets, steps).

The fields are typed as ``Literal`` so the Prefect form shows a drop-down; ``check_choices`` runs
before pydantic's own check so that a typo is answered with the closest valid name, not only
the list of all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def check_choices(values, choices: Iterable[str], what: str):
    """``values`` (a name or a list of names) unchanged if every name is in ``choices``."""
    choices = list(choices)
    for value in [values] if isinstance(values, str) else list(values or []):
        if isinstance(value, str) and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} {value!r}{hint}; known: {choices}")
    return values
