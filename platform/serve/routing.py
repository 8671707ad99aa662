"""Which model version answers a request, and the store that moving an alias changes.

``model`` in a request may be ``name`` (its A/B split when one is set, else the default alias,
else its only version), ``name@alias``, ``name@<version>`` or an MLflow-style ``models:/name@alias``
/ ``models:/name/<version>``. A split is a list of (alias or version, weight); a user id
(the request's ``user`` field) is hashed with the model name into [0, 1), so a user keeps the
same arm for as long as the split is unchanged (sticky), and arms get traffic in proportion to
their weights. Requests without a user are assigned at random.

The table is a plain value (``RouteTable``); ``LocalRouteStore`` holds one in process, and
``app.RouteStoreActor`` is the same store as a named Ray actor that every gateway replica reads,
so an alias move is seen by all replicas at once. A request resolves its version once, at the
start, and keeps it: moving an alias never disturbs a request in flight.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from pydantic import BaseModel, Field, model_validator


class UnknownModel(LookupError):
    """No served version matches the request's ``model``."""


class Arm(BaseModel):
    target: str = Field(..., description="alias or version of the same model")
    weight: float = Field(..., gt=0)


class RouteTable(BaseModel):
    versions: dict[str, list[str]] = Field(default_factory=dict)            # name -> served versions
    aliases: dict[str, dict[str, str]] = Field(default_factory=dict)         # name -> alias -> version
    splits: dict[str, list[Arm]] = Field(default_factory=dict)               # name -> A/B arms
    default_alias: str = "champion"
    revision: int = 0                                                         # bumped by every change

    @model_validator(mode="after")
    def _aliases_point_at_served_versions(self) -> "RouteTable":
        for name, table in self.aliases.items():
            for alias, version in table.items():
                if version not in self.versions.get(name, []):
                    raise ValueError(f"alias {name}@{alias} -> version {version!r}, which is not served")
        return self

    # ------------------------------------------------------------------ resolution
    def resolve(self, model: str, user: str | None = None) -> "Route":
        name, selector = _parse(model)
        if name not in self.versions:
            raise UnknownModel(f"the model {model!r} does not exist; served: {', '.join(self.model_ids()) or 'none'}")
        if selector is None:
            if name in self.splits:
                arm = _pick(self.splits[name], f"{name}|{user}" if user else None)
                return Route(name, self._version(name, arm.target, model), via=f"split:{arm.target}")
            if self.default_alias in self.aliases.get(name, {}):
                return Route(name, self.aliases[name][self.default_alias], via=self.default_alias)
            if len(self.versions[name]) == 1:
                return Route(name, self.versions[name][0], via="only")
            raise UnknownModel(f"the model {model!r} has several versions and no {self.default_alias!r} alias; "
                               f"ask for one of {', '.join(self.model_ids())}")
        return Route(name, self._version(name, selector, model), via=selector)

    def _version(self, name: str, selector: str, model: str) -> str:
        if selector in self.aliases.get(name, {}):
            return self.aliases[name][selector]
        if selector in self.versions[name]:
            return selector
        raise UnknownModel(f"the model {model!r} does not exist (no alias or version {selector!r} of {name!r})")

    def model_ids(self) -> list[str]:
        ids = []
        for name, versions in self.versions.items():
            ids.append(name)
            ids += [f"{name}@{a}" for a in self.aliases.get(name, {})]
            ids += [f"{name}@{v}" for v in versions]
        return ids

    # ------------------------------------------------------------------ changes (return a new table)
    def with_alias(self, name: str, alias: str, version: str) -> "RouteTable":
        aliases = {n: dict(t) for n, t in self.aliases.items()}
        aliases.setdefault(name, {})[alias] = version
        return self.model_copy(update={"aliases": aliases, "revision": self.revision + 1}).validated()

    def with_version(self, name: str, version: str) -> "RouteTable":
        versions = {n: list(v) for n, v in self.versions.items()}
        if version not in versions.setdefault(name, []):
            versions[name].append(version)
        return self.model_copy(update={"versions": versions, "revision": self.revision + 1}).validated()

    def with_split(self, name: str, arms: list[Arm] | None) -> "RouteTable":
        splits = dict(self.splits)
        if arms:
            splits[name] = list(arms)
        else:
            splits.pop(name, None)
        table = self.model_copy(update={"splits": splits, "revision": self.revision + 1}).validated()
        for arm in arms or []:
            table._version(name, arm.target, name)  # every arm must resolve now, not at request time
        return table

    def validated(self) -> "RouteTable":
        return RouteTable.model_validate(self.model_dump())


@dataclass(frozen=True)
class Route:
    name: str
    version: str
    via: str  # how it was chosen: an alias, "split:<arm>", "only" or the version itself

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def _parse(model: str) -> tuple[str, str | None]:
    if model.startswith("models:/"):
        rest = model[len("models:/"):]
        if "@" in rest:
            name, sel = rest.split("@", 1)
            return name, sel
        if "/" in rest:
            name, sel = rest.rsplit("/", 1)
            return name, sel
        return rest, None
    if "@" in model:
        name, sel = model.split("@", 1)
        return name, sel or None
    return model, None


def sticky_bucket(key: str) -> float:
    """A stable number in [0, 1) for a key (sha256; the same in every process and run)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _pick(arms: list[Arm], sticky_key: str | None) -> Arm:
    u = sticky_bucket(sticky_key) if sticky_key is not None else random.random()
    total = sum(a.weight for a in arms)
    acc = 0.0
    for arm in arms:
        acc += arm.weight / total
        if u < acc:
            return arm
    return arms[-1]


class LocalRouteStore:
    """The route table held in process (tests, a single gateway); the Ray actor has the same methods."""

    def __init__(self, table: RouteTable) -> None:
        self.table = table

    async def get(self) -> RouteTable:
        return self.table

    async def update(self, table: RouteTable) -> int:
        self.table = table
        return table.revision
