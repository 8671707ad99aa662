"""Recipes: named, versioned stage configs kept as YAML under ``configs/``.

A recipe is a mapping ``{stage: {field: value}}``. It may name a ``base`` recipe, which
it copies and changes (deep merge), so ``small`` is "tiny, but bigger" in a few lines.
``--set stage.field=value`` overrides are applied last; values are parsed as YAML, so
``--set pretrain.max_steps=50`` gives an int and ``--set curate.sources=[a,b]`` a list.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .config import config_hash  # noqa: F401  (the one config_hash; recipes.config_hash is kept for callers)


class RecipeError(ValueError):
    pass


def recipe_dirs() -> list[Path]:
    """Where named recipes are looked up: the project's ``configs/`` folder."""
    return [Path(__file__).resolve().parent.parent / "configs"]


def available_recipes() -> list[str]:
    names: set[str] = set()
    for d in recipe_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _find(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for d in recipe_dirs():
        candidate = d / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise RecipeError(f"unknown recipe {name_or_path!r}; known: {', '.join(available_recipes()) or 'none'}")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), _seen: tuple = ()) -> dict[str, Any]:
    path = _find(name_or_path)
    if path in _seen:
        raise RecipeError(f"recipe base cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of stage -> config")
    base_name = data.pop("base", None)
    own_name = data.pop("name", path.stem)
    if base_name:
        data = deep_merge(load_recipe(base_name, (), (*_seen, path)), data)
    data["name"] = own_name
    return apply_overrides(data, overrides)


def apply_overrides(recipe: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    out = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"--set has an empty key: {item!r}")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {part!r} is not a mapping")
        node[parts[-1]] = parse_value(raw)
    return out


def parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus floats like ``3e-4`` that YAML 1.1 reads as strings."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


