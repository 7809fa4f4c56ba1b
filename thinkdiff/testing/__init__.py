"""Test support: tiny random models of every supported family (`tiny_models`), built offline. Production code
imports this package only to resolve `tiny:KIND` model names."""
