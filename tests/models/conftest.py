"""Fixtures of the model tests; the helpers live in model_helpers.py (a unique module name, since
several test folders have a conftest.py and `from conftest import ...` would pick whichever loaded
first)."""

from model_helpers import _one_torch_thread, sd1_file, tiny_clip  # noqa: F401 (fixtures)
