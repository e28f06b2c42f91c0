"""Recipes shipped with tuneport, and the files the built-in demo uses (recipes/demo/)."""
