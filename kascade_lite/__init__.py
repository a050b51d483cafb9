"""kascade-lite: Kascade sparse attention on real LLaMA weights, in JAX."""
