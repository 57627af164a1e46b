"""Shared test settings: nothing may reach the network (weights, tokenizers and data are local).

Keep this file small; fixtures of one layer live in that layer's test folder.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
