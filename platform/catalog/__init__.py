"""Lineage catalog: which run made which artefact from what, with which config and code.

``Catalog`` (catalog.py) is the API; ``models.py`` holds the ORM tables; the schema is
created and upgraded by the Alembic migrations shipped inside this package
(``migrations/``), which ``Catalog(url)`` applies on open. ``ids.py`` holds the id,
config-hash and code-version helpers shared with tracking.
"""

from .catalog import Catalog, NotFoundError
from .db import CatalogError, make_engine, normalize_url
from .ids import code_version, config_hash, new_id

__all__ = [
    "Catalog",
    "CatalogError",
    "NotFoundError",
    "code_version",
    "config_hash",
    "make_engine",
    "new_id",
    "normalize_url",
]
