"""The method registry: `model.name` in the config picks a method folder.

Adding a method = its folder (with `METHOD` in its __init__.py), a config file in configs/ and
one line in METHODS below (docs/methods.md).
"""

from __future__ import annotations

import importlib

import ml_collections

from magnet_jax.methods.base import BASE_BATCH_KEYS, Method, Objective

# model.name -> the module that defines METHOD (imported on first use).
METHODS = {
    "magnet": "magnet_jax.methods.magnet",
    "jmceln": "magnet_jax.methods.jmceln",
    "cmmasksd": "magnet_jax.methods.cmmasksd",
    "mail": "magnet_jax.methods.mail",
}


class MethodError(ValueError):
    """An unknown method, or a config or checkpoint that belongs to another method."""


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown model.name {name!r}; known methods: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name]).METHOD


def method_of(model_cfg) -> Method:
    """The method of a `model` config section (a ConfigDict or a dict)."""
    name = model_cfg.get("name") if hasattr(model_cfg, "get") else None
    if name is None:
        raise MethodError("the model config has no name; set model.name to one of "
                          f"{', '.join(METHODS)}")
    return get_method(name)


def build_model(model_cfg: ml_collections.ConfigDict):
    """The Linen module of the method named by model_cfg.name."""
    return method_of(model_cfg).build_model(model_cfg)


def owner_of_key(key: str, current: str | None) -> str | None:
    """The method other than `current` whose config section holds the dotted `key`
    ("mg.weight" -> "magnet", "model.clip.tokenizer" -> "cmmasksd"), if any."""
    parts = key.split(".")
    for name in METHODS:
        if name == current:
            continue
        other = get_method(name)
        if parts[0] in other.config_sections or (
                parts[0] == "model" and len(parts) > 1 and parts[1] in other.model_sections):
            return name
    return None


def check_config(config: ml_collections.ConfigDict) -> Method:
    """The run config's method, after checking that no section of another method is set."""
    method = method_of(config.model)
    sections = [s for s in config if s != "model"] + [f"model.{s}" for s in config.model]
    for section in sections:
        owner = owner_of_key(section, method.name)
        if owner is not None:
            raise MethodError(f"config section {section!r} belongs to method {owner!r}, "
                              f"but model.name is {method.name!r}")
    return method


def check_same_method(found: str, expected: str, what: str) -> None:
    """A checkpoint of one method given to another: one line naming both."""
    if found != expected:
        raise MethodError(f"{what} holds a {found!r} checkpoint, but model.name is {expected!r}")


__all__ = ["METHODS", "Method", "Objective", "BASE_BATCH_KEYS", "MethodError", "get_method",
           "method_of", "build_model", "check_config", "check_same_method", "owner_of_key"]
