"""A RULER-style synthetic retrieval task ("needle in a haystack"), generated offline from a seed.

Each case is a chat prompt of exactly ``length`` tokens (SmolLM2 chat template): a haystack holding one needle
such as ``The special magic number for <key> is <7 digits>.`` — optionally with distractor needles for other keys —
then the question, and the assistant's answer already started (``The special magic number for <key> is``). The
model's greedy continuation is scored by exact match of the first 7-digit number it writes.

Two haystacks (``haystack=``):

* ``"noise"``: RULER's repeated filler sentences. The needle is the only novel text in the prompt, which flatters
  any method that selects keys by how much attention they draw.
* ``"wikitext-test"`` / ``"wikitext-valid"``: consecutive WikiText-2 paragraphs from a random start (the raw test
  split for published tables, the validation split — detokenised, lines with ``<unk>`` dropped — for held-out
  method choices). The needle now competes with natural text.

``wording="varied"`` draws the needle, question and answer prefix from `WORDINGS` per case (one template each);
``"fixed"`` always uses the first. Distractor needles share the case's wording.

Prompts are assembled from token ids (template pieces, haystack and needles tokenised separately), so every case of
a given length has the same shape: one compilation per (length, attention). `answer_case` runs one case under
several methods, sharing the prompt pass between methods that prefill alike.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .data import load_tokenizer
from .model import AttentionFn, KVCache, Llama, decode, forward

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
KEYS = ("apple", "river", "candle", "garden", "mirror", "pencil", "window", "forest", "button", "rocket", "basket",
        "violin", "anchor", "saddle", "harbor", "lantern", "meadow", "pepper", "castle", "ribbon")
HAYSTACKS = ("noise", "wikitext-test", "wikitext-valid")


@dataclass(frozen=True)
class Wording:
    """One needle template: the ``needle`` sentence, the ``question`` asked after the haystack and the assistant's
    ``answer`` prefix, each formatted with ``key`` (and the needle with ``value``)."""

    needle: str
    question: str
    answer: str


WORDINGS = (
    Wording(" The special magic number for {key} is {value}. ",
            "What is the special magic number for {key} mentioned in the text above?",
            "The special magic number for {key} is"),
    Wording(" The access code of the {key} locker is {value}. ",
            "What is the access code of the {key} locker given in the text above?",
            "The access code of the {key} locker is"),
    Wording(" For the record, the {key} account has the ID {value}. ",
            "Which ID does the {key} account have, according to the text above?",
            "The {key} account has the ID"),
    Wording(" Note that the serial of the {key} crate reads {value}. ",
            "What does the serial of the {key} crate read in the text above?",
            "The serial of the {key} crate reads"),
)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MAX_NEW_TOKENS = 9  # " " + 7 digits + "."


@dataclass(frozen=True)
class RetrievalCase:
    """One prompt ``ids: [length]`` int32 and its expected 7-digit ``answer``; ``depth`` is where the needle sits
    (0 = start of the haystack, 1 = end), ``needle`` its token positions ``[start, end)`` in ``ids``."""

    ids: np.ndarray
    key: str
    answer: str
    depth: float
    needle: tuple[int, int] = (0, 0)
    wording: int = 0


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template(tokenizer: Any, key: str, wording: Wording = WORDINGS[0]) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: system + user turn opening; question + assistant answer prefix."""
    marker = "\x00HAYSTACK\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": marker + "\n\n" + wording.question.format(key=key)}],
        tokenize=False, add_generation_prompt=True) + wording.answer.format(key=key)
    before, after = text.split(marker)
    return _ids(tokenizer, before), _ids(tokenizer, after)


_PARAGRAPHS: dict[str, tuple[Any, list[list[int]]]] = {}
"""split -> (the tokenizer, its paragraph ids): the last tokenisation of each split, kept with its tokenizer."""


def wikitext_paragraphs(split: str, tokenizer: Any) -> list[list[int]]:
    """Token ids of every WikiText-2 paragraph of ``split`` (``"test"``: raw release; ``"validation"``: the
    tokenised release detokenised — `` @-@ `` → ``-``, `` @,@ `` → ``,``, `` @.@ `` → ``.`` — with ``<unk>``
    lines dropped), headings and blank lines skipped, each ending in a newline. Cached per tokenizer."""
    from .data import load_wikitext

    cached = _PARAGRAPHS.get(split)
    if cached is None or cached[0] is not tokenizer:
        text = load_wikitext(split)
        for mark, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
            text = text.replace(mark, plain)
        lines = [ln.strip() for ln in text.split("\n")]
        paragraphs = [ln for ln in lines if ln and not ln.startswith("=") and "<unk>" not in ln]
        _PARAGRAPHS[split] = (tokenizer, [_ids(tokenizer, p + "\n") for p in paragraphs])
    return _PARAGRAPHS[split][1]


def _haystack(haystack: str, n_fill: int, rng: np.random.Generator, tokenizer: Any, filler: str) -> list[int]:
    """``n_fill`` haystack token ids: the filler repeated, or consecutive WikiText paragraphs from a random one."""
    if haystack == "noise":
        sentence = _ids(tokenizer, filler)
        return (sentence * (n_fill // len(sentence) + 1))[:n_fill]
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {HAYSTACKS}")
    paragraphs = wikitext_paragraphs("test" if haystack == "wikitext-test" else "validation", tokenizer)
    fill, i = [], int(rng.integers(len(paragraphs)))
    while len(fill) < n_fill:
        fill += paragraphs[i % len(paragraphs)]
        i += 1
    return fill[:n_fill]


def make_case(length: int, rng: np.random.Generator, *, num_distractors: int = 0, tokenizer: Any = None,
              filler: str = FILLER, haystack: str = "noise", wording: str = "fixed") -> RetrievalCase:
    """One case of exactly ``length`` tokens: a random key and 7-digit value, the needle at a random sentence
    boundary of the ``haystack`` (see the module docstring), ``num_distractors`` needles for other keys at other
    boundaries; ``wording`` ``"fixed"`` or ``"varied"`` (one of `WORDINGS` drawn per case)."""
    if wording not in ("fixed", "varied"):
        raise ValueError(f"wording must be 'fixed' or 'varied', got {wording!r}")
    tok = tokenizer or load_tokenizer()
    keys = rng.choice(len(KEYS), size=1 + num_distractors, replace=False)
    key = KEYS[keys[0]]
    values = [str(v) for v in rng.integers(1_000_000, 10_000_000, size=len(keys))]
    w = int(rng.integers(len(WORDINGS))) if wording == "varied" else 0
    before, after = _template(tok, key, WORDINGS[w])
    needles = [_ids(tok, WORDINGS[w].needle.format(key=KEYS[k], value=v)) for k, v in zip(keys, values)]
    n_fill = length - len(before) - len(after) - sum(map(len, needles))
    if n_fill < 16:
        raise ValueError(f"length={length} tokens is too short for the template and {len(needles)} needle(s)")
    fill = _haystack(haystack, n_fill, rng, tok, filler)
    boundaries = [i + 1 for i, t in enumerate(fill) if tok.decode([t]).strip().endswith(".")]
    if len(boundaries) < len(needles):
        raise ValueError(f"the {haystack} haystack of {n_fill} tokens has {len(boundaries)} sentence ends; "
                         f"{len(needles)} needle(s) need as many")
    spots = sorted(rng.choice(boundaries, size=len(needles), replace=False).tolist())
    order = rng.permutation(len(needles))  # which needle goes to which spot
    hay, last, span = [], 0, (0, 0)
    for spot, j in zip(spots, order):
        hay += fill[last:spot]
        if j == 0:
            span = (len(before) + len(hay), len(before) + len(hay) + len(needles[0]))
        hay += needles[j]
        last = spot
    hay += fill[last:]
    ids = np.asarray(before + hay + after, np.int32)
    assert ids.shape == (length,), ids.shape
    depth = spots[list(order).index(0)] / n_fill
    return RetrievalCase(ids=ids, key=key, answer=values[0], depth=float(depth), needle=span, wording=w)


def make_cases(length: int, num: int, seed: int = 0, **kw: Any) -> list[RetrievalCase]:
    """``num`` reproducible cases of ``length`` tokens (seeded by ``(seed, length)``)."""
    rng = np.random.default_rng([seed, length])
    return [make_case(length, rng, **kw) for _ in range(num)]


def extract_answer(text: str) -> str | None:
    """The first 7-digit number in ``text`` (the model's continuation), or None."""
    m = re.search(r"(?<!\d)(\d{7})(?!\d)", text)
    return m.group(1) if m else None


@dataclass(frozen=True)
class RetrievalMethod:
    """How one method answers a case: ``prefill`` attention for the prompt, ``decode`` attention for each generated
    token. A sparse ``decode`` after a dense ``prefill`` is the "decode-only" setting of Quest's paper."""

    prefill: AttentionFn
    decode: AttentionFn


def answer_case(model: Llama, case: RetrievalCase, methods: Mapping[str, RetrievalMethod], *,
                cache_multiple: int = 32, tokenizer: Any = None,
                reads: Mapping[str, Callable[[Any, int], float]] | None = None) -> dict[str, dict[str, Any]]:
    """Greedy-decode ``case`` under every method and score exact match.

    Methods with the same ``prefill`` attention share one prefill (a dense prompt pass serves dense decoding and
    every decode-only method). The KV cache holds the prompt and ``MAX_NEW_TOKENS``, rounded up to
    ``cache_multiple`` positions (key-tile gathers then read whole tiles). Returns ``{method: {"output", "correct",
    "seconds"}}``; seconds include the prefill for the first method that needs it. ``reads``: for the methods it
    names, ``f(carry, context) -> K/V read share`` of one decode step (`tradeoff.selection_read_share`); their
    results add ``kv_read_share``, the mean over the decode steps.
    """
    tok = tokenizer or load_tokenizer()
    prompt = jnp.asarray(case.ids[None], jnp.int32)
    max_len = -(-(prompt.shape[1] + MAX_NEW_TOKENS) // cache_multiple) * cache_multiple
    prefilled: dict[AttentionFn, tuple[jax.Array, KVCache]] = {}
    results = {}
    for name, method in methods.items():
        t0 = time.perf_counter()
        if method.prefill not in prefilled:
            cache = KVCache.empty(model.cfg, 1, max_len, model.dtype)
            logits, cache, _ = forward(model, prompt, cache, method.prefill, last_only=True)
            prefilled[method.prefill] = (logits, cache)
        logits, cache = prefilled[method.prefill]
        shares: list[float] = []
        rule = (reads or {}).get(name)
        on_carry = None if rule is None else (lambda carry: shares.append(rule(carry, len(case.ids) + len(shares) + 1)))
        out = decode(model, logits, cache.copy(), MAX_NEW_TOKENS, attention=method.decode,  # decode consumes it
                     on_carry=on_carry)[0]
        text = tok.decode(out.tolist(), skip_special_tokens=True)
        results[name] = dict(output=text, correct=extract_answer(text) == case.answer,
                             seconds=round(time.perf_counter() - t0, 3))
        if shares:
            results[name]["kv_read_share"] = round(float(np.mean(shares)), 5)
    return results


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (``z = 1.96``) Wilson score interval of an accuracy ``correct / n``: ``(low, high)`` in [0, 1]. Unlike the
    normal approximation it stays inside [0, 1] and is not degenerate at 0 or ``n`` correct."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p, denom = correct / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_outcomes(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> tuple[int, int, int, int]:
    """Two methods' per-case results (dicts with ``index`` and ``correct``), compared on the cases both answered:
    ``(both right, only a right, only b right, both wrong)``."""
    right_b = {c["index"]: bool(c["correct"]) for c in b}
    pairs = [(bool(c["correct"]), right_b[c["index"]]) for c in a if c["index"] in right_b]
    return (sum(x and y for x, y in pairs), sum(x and not y for x, y in pairs),
            sum(y and not x for x, y in pairs), sum(not (x or y) for x, y in pairs))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test of two methods on the same cases: the probability, were both equally accurate,
    of a split of the ``only_a + only_b`` discordant cases at least this uneven (Binomial(n, 1/2)); 1.0 if n = 0."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"need non-negative counts, got only_a={only_a}, only_b={only_b}")
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
