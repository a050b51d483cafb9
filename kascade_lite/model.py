"""A Llama-3.x decoder in Flax NNX that you can read in one sitting.

A `Block` is ``x = x + self.attn(self.attn_norm(x)); x = x + self.mlp(self.mlp_norm(x))``, where ``attn(y)`` is
``wo(attention(rope(y·wq), rope(y·wk), y·wv))`` and ``mlp(y)`` is ``w_down(silu(y·w_gate) * y·w_up)``.

Weights are stored ``[in, out]`` (so a projection is ``x @ w``) and K/V keep their ``num_kv_heads`` heads: the cache
is **head-major** ``[batch, kv_heads, max_len, head_dim]`` per layer, never expanded to the query heads. Each KV
head's keys are then one contiguous block, so a decode step's score and value products read the cache in place; the
sequence-major ``[batch, max_len, kv_heads, head_dim]`` that the projection produces is transposed once, when the new
tokens are written (chapter 08 measures what the layout costs).

Attention is **pluggable per layer**: every block calls ``attention(layer, q, k, v, q_offset=, kv_len=, carry=)``
and threads ``carry`` from layer to layer. The dense default ignores ``carry``; Kascade's anchor layers put their
Top-k indices in it and the reuse layers that follow read them (see `kascade.py`).

**The cache is read by one program and written by another.** The jitted forward (`forward_split`) only *reads*
the cache and returns this step's keys and values; `KVCache.write` (jitted, the cache donated) then writes them in
place. XLA's CPU backend copies a donated buffer that the same program also reads (eight full copies of each
layer's cache per dense decode step, measured on the compiled HLO), so a fused read-and-write step would copy the
whole cache every token. An attention function that sets ``reads_new_separately = True`` receives the cache as it
was before the step (valid below ``q_offset``) plus ``new=(k_new, v_new)`` and combines them itself (the dense
default and Kascade do, in decode); any other receives ``k, v`` with the new tokens written into a copy.

Tensor names (used by `checkpoints.py`, `convert.py` and `from_tensors`): ``embed [vocab, hidden]``,
``final_norm [hidden]``, ``lm_head [hidden, vocab]`` (absent when tied), and per layer ``layers.{i}.attn_norm``,
``wq [hidden, H*d]``, ``wk``/``wv [hidden, Hkv*d]``, ``wo [H*d, hidden]``, ``mlp_norm``,
``w_gate``/``w_up [hidden, inter]``, ``w_down [inter, hidden]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import gqa_attention, gqa_attention_with_new
from .config import LlamaConfig
from .rope import apply_rope, inverse_frequencies, rope_cos_sin

LAYER_TENSORS: dict[str, str] = {
    # name: shape expression in terms of the config, used for validation
    "attn_norm": "hidden", "wq": "hidden,q_dim", "wk": "hidden,kv_dim", "wv": "hidden,kv_dim",
    "wo": "q_dim,hidden", "mlp_norm": "hidden", "w_gate": "hidden,inter", "w_up": "hidden,inter",
    "w_down": "inter,hidden",
}


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model with its ``[in, out]`` shape (the contract between convert and model)."""
    dims = dict(hidden=cfg.hidden_size, q_dim=cfg.num_heads * cfg.head_dim,
                kv_dim=cfg.num_kv_heads * cfg.head_dim, inter=cfg.intermediate_size)
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    for i in range(cfg.num_layers):
        for name, expr in LAYER_TENSORS.items():
            shapes[f"layers.{i}.{name}"] = tuple(dims[e] for e in expr.split(","))
    return shapes


# ------------------------------------------------------------------------------------------------ attention hook
class AttentionFn(Protocol):
    """Per-layer attention. q: ``[batch, q_len, heads, head_dim]`` (RoPE applied), k/v: ``[batch, kv_heads,
    kv_total, head_dim]`` (the whole head-major cache, valid up to ``kv_len``). Returns ``([batch, q_len, heads,
    head_dim], carry)``. Must be hashable: it is a static argument of the jitted forward.

    With ``reads_new_separately = True`` the function is called with ``new=(k_new, v_new)`` (this step's keys and
    values ``[batch, kv_heads, q_len, head_dim]``, positions ``q_offset + i``) and k/v valid below ``q_offset`` only:
    the new keys are not yet in the cache (see the module docstring; `write_new` puts them into a copy)."""

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]: ...


def write_new(k: jax.Array, v: jax.Array, new: tuple[jax.Array, jax.Array] | None,
              q_offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cache ``k, v: [batch, kv_heads, L, head_dim]`` with ``new = (k_new, v_new)`` written at ``q_offset`` (a
    copy, unless XLA can update in place); ``new=None`` returns ``k, v`` unchanged."""
    if new is None:
        return k, v
    return (jax.lax.dynamic_update_slice_in_dim(k, new[0].astype(k.dtype), q_offset, axis=2),
            jax.lax.dynamic_update_slice_in_dim(v, new[1].astype(v.dtype), q_offset, axis=2))


def dense_attention(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                    kv_len: jax.Array, carry: Any, new: tuple[jax.Array, jax.Array] | None = None
                    ) -> tuple[jax.Array, Any]:
    """The default: exact causal GQA in every layer. A decode step reads the cache in place and its own key
    separately (`attention.gqa_attention_with_new`); a prefill attends over the cache with its keys written."""
    if new is not None and q.shape[1] == 1:
        return gqa_attention_with_new(q, k, v, *new, q_offset=q_offset), carry
    k, v = write_new(k, v, new, q_offset)
    return gqa_attention(q, k, v, causal=True, q_offset=q_offset, kv_len=kv_len), carry


dense_attention.reads_new_separately = True


# ------------------------------------------------------------------------------------------------ KV cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, head-major ``[batch, kv_heads, max_len, head_dim]``, and the number of filled
    positions."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length: jax.Array  # int32 scalar

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def write(self, new: "NewKV") -> "KVCache":
        """This cache with ``new`` (per layer ``(k_new, v_new)``, each ``[batch, kv_heads, s, head_dim]``) written at
        ``length``, and ``length + s``. Jitted with the cache donated (`write_cache`) it updates the buffers in place:
        the program reads nothing but the new keys."""
        written = [write_new(k, v, kv, self.length) for k, v, kv in zip(self.k, self.v, new)]
        return KVCache(tuple(k for k, _ in written), tuple(v for _, v in written),
                       (self.length + new[0][0].shape[2]).astype(jnp.int32))

    def copy(self) -> "KVCache":
        """A copy with buffers of its own (to keep a cache that a donating step would consume)."""
        return jax.tree.map(jnp.copy, self)


NewKV = tuple[tuple[jax.Array, jax.Array], ...]
"""One step's keys and values per layer: ``(k_new, v_new)``, each head-major ``[batch, kv_heads, s, head_dim]``."""


# ------------------------------------------------------------------------------------------------ modules
class RMSNorm(nnx.Module):
    """``x / rms(x) * w``, computed in float32 (as the reference implementation does)."""

    def __init__(self, dim: int, eps: float, param_dtype: Any):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * 0.02)


class Block(nnx.Module):
    """One decoder layer: pre-norm GQA attention and a SwiGLU MLP, both residual."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, param_dtype: Any):
        h, qd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype)
        self.wq, self.wk, self.wv = (_init(rngs, (h, qd), param_dtype), _init(rngs, (h, kvd), param_dtype),
                                     _init(rngs, (h, kvd), param_dtype))
        self.wo = _init(rngs, (qd, h), param_dtype)
        self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype)
        self.w_gate = _init(rngs, (h, cfg.intermediate_size), param_dtype)
        self.w_up = _init(rngs, (h, cfg.intermediate_size), param_dtype)
        self.w_down = _init(rngs, (cfg.intermediate_size, h), param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv: tuple[jax.Array, jax.Array] | None, *,
                 layer: int, offset: jax.Array, attention: AttentionFn, carry: Any
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], Any, jax.Array]:
        """``x: [batch, seq, hidden]`` at positions ``offset + arange(seq)`` (``cos``/``sin``: their RoPE tables).

        ``kv``: this layer's cache ``(k, v)``, each ``[batch, kv_heads, max_len, head_dim]``, or ``None``. Returns
        ``(x after the block, this step's (k, v) [batch, kv_heads, seq, head_dim], attention carry, attention output
        [batch, seq, hidden])``."""
        a, kv, carry = self.attn(self.attn_norm(x), cos, sin, kv, layer=layer, offset=offset, attention=attention,
                                 carry=carry)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv, carry, a

    def attn(self, y: jax.Array, cos: jax.Array, sin: jax.Array, kv: tuple[jax.Array, jax.Array] | None, *,
             layer: int, offset: jax.Array, attention: AttentionFn, carry: Any
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], Any]:
        """Attention of the normed ``y: [batch, seq, hidden]``: rotated q ``[b, s, H, d]``, rotated k and v
        transposed to head-major ``[b, Hkv, s, d]``, ``attention`` over the cache ``kv`` and these keys (module
        docstring: written into a copy of ``kv``, or handed over beside it), then ``wo``.
        Returns ``(output [b, s, hidden], (k, v) of this step in the cache's dtype, carry)``."""
        c, (b, s, _) = self.cfg, y.shape
        q = (y @ self.wq[...].astype(y.dtype)).reshape(b, s, c.num_heads, c.head_dim)
        k = (y @ self.wk[...].astype(y.dtype)).reshape(b, s, c.num_kv_heads, c.head_dim)
        v = (y @ self.wv[...].astype(y.dtype)).reshape(b, s, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                   # head-major [b, Hkv, s, d]
        if kv is None:
            new, ctx = (k, v), {}
            o, carry = attention(layer, q, k, v, q_offset=offset, kv_len=offset + s, carry=carry)
        else:
            new = (k.astype(kv[0].dtype), v.astype(kv[1].dtype))              # as the cache will hold them
            cast = (new[0].astype(q.dtype), new[1].astype(q.dtype))
            if getattr(attention, "reads_new_separately", False):
                ctx = dict(new=cast)
                k, v = kv
            else:
                ctx, (k, v) = {}, write_new(*kv, new, offset)
            o, carry = attention(layer, q, k.astype(q.dtype), v.astype(q.dtype), q_offset=offset,
                                 kv_len=offset + s, carry=carry, **ctx)
        return o.reshape(b, s, -1) @ self.wo[...].astype(y.dtype), new, carry

    def mlp(self, y: jax.Array) -> jax.Array:
        """SwiGLU of the normed ``y: [batch, seq, hidden]``: ``w_down(silu(y @ w_gate) * (y @ w_up))``."""
        gate = jax.nn.silu(y @ self.w_gate[...].astype(y.dtype))
        return (gate * (y @ self.w_up[...].astype(y.dtype))) @ self.w_down[...].astype(y.dtype)


class Llama(nnx.Module):
    """The whole decoder. ``param_dtype`` is how weights are stored, ``dtype`` how activations are computed."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None = None, param_dtype: Any = jnp.float32,
                 dtype: Any = jnp.float32):
        rngs = rngs or nnx.Rngs(0)
        self.cfg, self.dtype = cfg, dtype
        self.embed = _init(rngs, (cfg.vocab_size, cfg.hidden_size), param_dtype)
        self.layers = nnx.List([Block(cfg, rngs, param_dtype) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _init(rngs, (cfg.hidden_size, cfg.vocab_size), param_dtype)
        self.inv_freq = nnx.Variable(jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)))

    # -------------------------------------------------------------------------------------------- weights
    def tensors(self) -> Iterator[tuple[str, nnx.Variable]]:
        """``(name, variable)`` for every weight, in the naming of the module docstring."""
        yield "embed", self.embed
        yield "final_norm", self.final_norm.weight
        if self.lm_head is not None:
            yield "lm_head", self.lm_head
        for i, blk in enumerate(self.layers):
            for name in LAYER_TENSORS:
                var = getattr(blk, name)
                yield f"layers.{i}.{name}", var.weight if isinstance(var, RMSNorm) else var

    def load_tensors(self, tensors: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
        """Copy arrays into the model, checking names and shapes. ``strict`` also demands every tensor."""
        variables = dict(self.tensors())
        extra = sorted(set(tensors) - set(variables))
        if extra:
            raise ValueError(f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}")
        missing = sorted(set(variables) - set(tensors))
        if strict and missing:
            raise ValueError(f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for name, arr in tensors.items():
            var = variables[name]
            current = var.get_value()  # an array, or a ShapeDtypeStruct inside `from_tensors`
            if tuple(arr.shape) != tuple(current.shape):
                raise ValueError(f"tensor {name}: shape {tuple(arr.shape)} != expected {tuple(current.shape)}")
            var.set_value(jnp.asarray(arr, current.dtype))

    @classmethod
    def from_tensors(cls, cfg: LlamaConfig, tensors: Mapping[str, np.ndarray], *, param_dtype: Any = jnp.float32,
                     dtype: Any = jnp.float32) -> "Llama":
        """Build a model directly from named ``[in, out]`` arrays, without allocating random weights first."""
        model = nnx.eval_shape(lambda: cls(cfg, param_dtype=param_dtype, dtype=dtype))
        model.inv_freq.set_value(jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)))
        model.load_tensors(tensors)
        return model

    # -------------------------------------------------------------------------------------------- forward
    def __call__(self, tokens: jax.Array, *, cache: KVCache | None = None, attention: AttentionFn = dense_attention,
                 carry: Any = None, collect: bool = False, last_only: bool = False
                 ) -> tuple[jax.Array, NewKV, Any]:
        """Run ``tokens: [batch, seq]`` (int) after the ``cache.length`` positions already in ``cache``; the cache is
        only read (`KVCache.write` stores this step's keys and values afterwards).

        Returns ``(logits [batch, seq, vocab] float32, this step's (k, v) per layer, aux)``; with ``last_only`` the
        logits are ``[batch, 1, vocab]``, the last position's only (a prefill that only samples the next token skips
        the ``seq x vocab`` output projection: 0.46 TFLOP for SmolLM2 at 8k tokens). ``aux`` is the final attention
        ``carry``, or with ``collect=True`` a dict ``{"carry", "residual", "attn_out"}`` where the two lists hold,
        per layer, the block input and the attention output ``[batch, seq, hidden]`` (for layer importance).
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        s = tokens.shape[1]
        offset = jnp.zeros((), jnp.int32) if cache is None else cache.length
        if cache is not None and isinstance(cache.max_len, int) and s > cache.max_len:
            raise ValueError(f"{s} tokens do not fit a cache of max_len={cache.max_len}")
        if s > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {s} tokens exceeds "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        cos, sin = rope_cos_sin(offset + jnp.arange(s), self.inv_freq[...])
        x = self.embed[...].astype(self.dtype)[tokens]
        kvs, residual, attn_outs = [], [], []
        for i, blk in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            residual.append(x)
            x, kv, carry, attn_out = blk(x, cos, sin, kv, layer=i, offset=offset, attention=attention, carry=carry)
            kvs.append(kv)
            attn_outs.append(attn_out)
        x = self.final_norm(x[:, -1:] if last_only else x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("bsh,hv->bsv", x, head.astype(x.dtype), preferred_element_type=jnp.float32)
        aux = dict(carry=carry, residual=residual, attn_out=attn_outs) if collect else carry
        return logits, tuple(kvs), aux


# ------------------------------------------------------------------------------------------------ jitted entry points
@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "collect", "last_only"))
def forward_split(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, cache: KVCache | None,
                  attention: AttentionFn = dense_attention, collect: bool = False, last_only: bool = False
                  ) -> tuple[jax.Array, NewKV, Any]:
    """The read-only program of a forward step: `Llama.__call__` on a model split by ``nnx.split``; returns
    ``(logits, this step's keys and values, aux)``. The cache is an input only, never copied."""
    return nnx.merge(graphdef, state)(tokens, cache=cache, attention=attention, collect=collect, last_only=last_only)


write_cache = jax.jit(KVCache.write, donate_argnums=0)
"""`KVCache.write` in place: the cache passed in is consumed (its buffers become the result's)."""
write_cache_copy = jax.jit(KVCache.write)
"""`KVCache.write` into new buffers: the cache passed in stays valid."""

ForwardFn = Callable[[jax.Array, "KVCache | None"], tuple[jax.Array, "KVCache | None", Any]]


def make_forward(model: Llama, attention: AttentionFn = dense_attention, *, donate: bool = False,
                 collect: bool = False, last_only: bool = False) -> ForwardFn:
    """``f(tokens, cache) -> (logits, updated cache or None, aux)``: the one forward step of the package.

    It runs two compiled programs, `forward_split` (reads the cache) and `write_cache` (writes this step's keys in
    place) or, without ``donate``, `write_cache_copy` (into new buffers; the caller's cache stays valid). With
    ``donate`` the cache passed in is consumed: a decode loop hands each step the cache the last one returned, so
    no step copies the cache (`decode`, the benchmarks; keep a shared cache with `KVCache.copy`). The model is split
    once here: ``nnx.jit`` would walk the module graph in Python on every call (~0.3 s for SmolLM2 on 2 CPU cores,
    more than a whole decode step) and ``nnx.split`` costs ~10 ms, which a decode step should not pay either."""
    graphdef, state = nnx.split(model)
    write = write_cache if donate else write_cache_copy

    def step(tokens: jax.Array, cache: KVCache | None) -> tuple[jax.Array, KVCache | None, Any]:
        logits, new, aux = forward_split(graphdef, state, tokens, cache, attention, collect, last_only)
        return logits, None if cache is None else write(cache, new), aux

    return step


def forward(model: Llama, tokens: jax.Array, cache: KVCache | None = None, attention: AttentionFn = dense_attention,
            collect: bool = False, last_only: bool = False, *, donate: bool = False
            ) -> tuple[jax.Array, KVCache | None, Any]:
    """One forward step, ``make_forward(model, attention, ...)(tokens, cache)``: returns ``(logits [batch, seq, vocab],
    updated cache or None, aux)``; compiles once per attention function and shape. ``donate`` consumes ``cache``."""
    return make_forward(model, attention, donate=donate, collect=collect, last_only=last_only)(tokens, cache)


def sample_next(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Next token ``[batch]`` from the last-position logits ``[batch, vocab]``: greedy when ``temperature == 0``,
    otherwise nucleus sampling (smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)  # keep tokens up to and including this one
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


StepFn = Callable[[jax.Array, KVCache], tuple[jax.Array, KVCache]]
"""One forward pass with the KV cache: ``(tokens [batch, seq], cache) -> (logits [batch, seq, vocab], cache)``."""


def decode_steps(step: StepFn, logits: jax.Array, cache: KVCache, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
    """The decode loop: pick the next token ``[batch]`` from the last position of ``logits: [batch, seq, vocab]``
    (`sample_next`), yield ``(token, the logits [batch, vocab] it was picked from)``, run ``step`` on it, repeat.

    Endless: the caller takes as many tokens as it wants. A token's forward pass runs only when the next token is
    asked for, so taking ``n`` tokens runs ``n - 1`` steps. ``step`` is `forward` for one model (`decode`) or a
    sharded forward (`kascade_lite.sharding.greedy_logits`)."""
    key = jax.random.PRNGKey(seed)
    while True:
        key, sub = jax.random.split(key)
        nxt = sample_next(logits[:, -1], sub, temperature, top_p).astype(jnp.int32)
        yield nxt, logits[:, -1]
        logits, cache = step(nxt[:, None], cache)


def decode(model: Llama, logits: jax.Array, cache: KVCache, max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, attention: AttentionFn = dense_attention,
           eos_token_id: int | None = None, progress: Callable[[int], None] | None = None,
           on_carry: Callable[[Any], None] | None = None) -> np.ndarray:
    """Decode one token at a time after a prefill: ``logits: [batch, seq, vocab]`` (the last position is used) and
    the ``cache`` that prefill filled, which the steps consume (each step donates its cache; pass ``cache.copy()``
    to keep it). ``on_carry`` is called with each step's final attention carry (e.g. Kascade's selections, to count
    the keys a step read). Returns the new token ids ``[batch, n]`` (``n <= max_new_tokens``; stops early when every
    row emitted ``eos_token_id``)."""
    step = make_forward(model, attention, donate=True)

    def run(tokens: jax.Array, c: KVCache) -> tuple[jax.Array, KVCache]:
        out, c, carry = step(tokens, c)
        if on_carry is not None:
            on_carry(carry)
        return out, c

    loop = decode_steps(run, logits, cache, temperature=temperature, top_p=top_p, seed=seed)
    out, done = [], jnp.zeros((logits.shape[0],), bool)
    for i in range(max_new_tokens):
        nxt, _ = next(loop)
        out.append(nxt[:, None])
        if progress is not None:
            progress(i)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
            if bool(done.all()):
                break
    return np.asarray(jnp.concatenate(out, axis=1)) if out else np.zeros((logits.shape[0], 0), np.int32)


def generate(model: Llama, prompt: jax.Array | np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, attention: AttentionFn = dense_attention,
             eos_token_id: int | None = None, cache_dtype: Any = None,
             progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Prefill ``prompt: [batch, prompt_len]`` then `decode` one token at a time with the KV cache.

    Returns ``[batch, prompt_len + n]`` token ids (``n <= max_new_tokens``; stops early when every row emitted
    ``eos_token_id``).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, prompt_len>0], got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, t = prompt.shape
    cache = KVCache.empty(model.cfg, b, t + max_new_tokens, cache_dtype or model.dtype)
    logits, cache, _ = forward(model, prompt, cache, attention, last_only=True, donate=True)
    new = decode(model, logits, cache, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                 attention=attention, eos_token_id=eos_token_id, progress=progress)
    return np.concatenate([np.asarray(prompt), new.astype(np.int32)], axis=1)
