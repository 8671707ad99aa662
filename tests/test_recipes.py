"""Recipes: lookup, base inheritance, ``--set`` overrides and config hashes."""

from __future__ import annotations

import pytest

from moeflow.platform import recipes


def test_tiny_recipe_exists():
    assert "tiny" in recipes.available_recipes()
    tiny = recipes.load_recipe("tiny")
    assert tiny["name"] == "tiny"
    assert "smoke" in tiny


def test_base_inheritance_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("pretrain:\n  max_steps: 10\n  lr: 0.001\ncurate:\n  sources: [a]\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\npretrain:\n  max_steps: 20\n")
    loaded = recipes.load_recipe(str(child), ["pretrain.lr=3e-4", "curate.sources=[x, y]", "new.flag=true"])
    assert loaded["pretrain"] == {"max_steps": 20, "lr": 3e-4}
    assert loaded["curate"]["sources"] == ["x", "y"]
    assert loaded["new"]["flag"] is True
    assert loaded["name"] == "child"


@pytest.mark.parametrize("bad", ["noequals", "=1"])
def test_bad_override(bad):
    with pytest.raises(recipes.RecipeError):
        recipes.apply_overrides({}, [bad])


def test_unknown_recipe_lists_known():
    with pytest.raises(recipes.RecipeError, match="tiny"):
        recipes.load_recipe("does-not-exist")


def test_base_cycle(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(recipes.RecipeError, match="cycle"):
        recipes.load_recipe(str(a))


def test_config_hash_is_order_independent():
    assert recipes.config_hash({"a": 1, "b": [1, 2]}) == recipes.config_hash({"b": [1, 2], "a": 1})
    assert recipes.config_hash({"a": 1}) != recipes.config_hash({"a": 2})
