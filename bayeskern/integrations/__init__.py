"""Integrations with training frameworks; each submodule imports its framework on first use
(``bayeskern.integrations.transformers``: ``pip install transformers``)."""
