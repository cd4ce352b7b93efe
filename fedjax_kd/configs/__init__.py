"""Built-in experiment configs (``get_config()`` files) and the flat view of a config."""

from collections.abc import Mapping


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict (e.g. a ``config.json``) -> ``{"dotted.key": value}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
