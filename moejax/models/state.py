"""Moved to :mod:`moejax.layers.state` (layers register their state updates
there without importing the models); this name stays for moejax/train.py
until its split (arch-train) imports the new home."""

from moejax.layers.state import STATE_UPDATES, update_model_state  # noqa: F401
