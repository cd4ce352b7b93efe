"""Built-in experiment configs (``get_config()`` files)."""
