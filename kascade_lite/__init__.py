"""kascade-lite: Kascade sparse attention on real LLaMA weights, in JAX."""

from . import progress as _progress  # noqa: F401  - imports tqdm.auto once, without its notebook-widget warning

REPOSITORY_URL = "https://github.com/kascade-lite/kascade-lite"
"""The project's repository: the one place code names it (the chapters' Colab setup cell and badge are made from it
by `kascade_lite.notebooks`, and a test checks them and ``book/_config.yml``). A fork changes this line and the
book config."""
