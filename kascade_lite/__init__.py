"""kascade-lite: Kascade sparse attention on real LLaMA weights, in JAX."""

from . import progress as _progress  # noqa: F401  - imports tqdm.auto once, without its notebook-widget warning
