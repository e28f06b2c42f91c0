"""Model definitions, one folder per family."""
