r"""The same Llama on a `jax.sharding.Mesh`: tensor parallelism over KV heads, data parallelism over the batch.

A mesh has two named axes: ``"data"`` splits the batch, ``"model"`` splits the KV heads (and with them the query
heads of their groups, the MLP width and the output vocabulary). Every weight gets a `PartitionSpec` from its name
(`param_spec`), Megatron style: the first matmul of each pair is split by output columns, the second by input
rows, so each pair needs one all-reduce and nothing in between::

    wq [hidden, H*d]      P(None, "model")   query heads h = kv*g + j: a contiguous block of columns per KV group
    wk, wv [hidden, Hkv*d] P(None, "model")   KV head kv lives on model-device kv // (Hkv / M)
    wo [H*d, hidden]      P("model", None)   partial sums, all-reduced over "model"
    w_gate, w_up          P(None, "model")   w_down  P("model", None)
    lm_head [hidden, V]   P(None, "model")   logits come out vocab-sharded
    embed, norms          P()                replicated (a gather by token id on a sharded table is not worth it)

The head-major KV cache ``[batch, kv_heads, max_len, head_dim]`` is ``P("data", "model", None, None)``: each device
keeps the keys and values of its own KV heads for its own sequences. Kascade's Top-k indices are kept per KV head, so
they are sharded the same way. `ShardedKascade` runs the policy per device under `jax.shard_map`, so a reuse layer whose
head map stays inside a device's heads reads them without any communication. `cross_device_reads` lists the
head-map entries that leave a device (those layers all-gather the small index tensor) and `localize_head_map`
removes them by renumbering the KV heads of reuse layers (a per-layer permutation that leaves outputs unchanged).

What a mesh must hold per device (weights, cache, Kascade's reads) is arithmetic: `kascade_lite.cost.memory_plan`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import LlamaConfig
from .model import KVCache, Llama, decode_steps, dense_attention, expected_shapes, forward
from .schedule import Schedule
from .kascade import KascadeAttention, Selection

DATA, MODEL = "data", "model"

COLUMN = P(None, MODEL)  # split the output features
ROW = P(MODEL, None)  # split the input features (the output is a partial sum)
REPLICATED = P()

PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"layers\.\d+\.(wq|wk|wv|w_gate|w_up)", COLUMN),
    (r"layers\.\d+\.(wo|w_down)", ROW),
    (r"layers\.\d+\.(attn_norm|mlp_norm)", REPLICATED),
    (r"lm_head", COLUMN),
    (r"embed|final_norm", REPLICATED),
)
"""(regular expression on the tensor name, spec); the first full match wins."""


# ------------------------------------------------------------------------------------------------ mesh
def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` devices (``model=None``: all the rest).

    A sub-mesh is allowed (e.g. 2 x 3 on 8 devices for a model with 3 KV heads). Axes are ``Auto``: XLA
    propagates shardings from the placed weights and inserts the collectives itself.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data <= 0:
        raise ValueError(f"make_mesh: data={data} must be positive")
    model = len(devices) // data if model is None else model
    if model <= 0 or data * model > len(devices):
        raise ValueError(f"make_mesh: mesh {data} x {model} needs {data * model} devices, have {len(devices)}")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def check_fits_mesh(cfg: LlamaConfig, mesh: Mesh) -> None:
    """Raise ``ValueError`` naming the dimension if the model axis does not divide what it splits."""
    m = mesh.shape[MODEL]
    dims = {"num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    if not cfg.tie_word_embeddings:
        dims["vocab_size"] = cfg.vocab_size
    for name, value in dims.items():
        if value % m:
            raise ValueError(f"{name}={value} is not divisible by the mesh's model axis ({m} devices); "
                             f"use a model axis that divides num_kv_heads={cfg.num_kv_heads}")


# ------------------------------------------------------------------------------------------------ parameters
def param_spec(name: str) -> P:
    """The `PartitionSpec` of a tensor named as in `kascade_lite.model.expected_shapes`."""
    for pattern, spec in PARAM_RULES:
        if re.fullmatch(pattern, name):
            return spec
    raise ValueError(f"no sharding rule for tensor {name!r}")


def param_specs(cfg: LlamaConfig) -> dict[str, P]:
    """``{tensor name: PartitionSpec}`` for every tensor of the model."""
    return {name: param_spec(name) for name in expected_shapes(cfg)}


def shard_model(model: Llama, mesh: Mesh) -> Llama:
    """Place every weight of ``model`` on ``mesh`` (in place, and returned) by `param_spec`; buffers replicate.

    Afterwards every array of ``nnx.state(model)`` is a `NamedSharding` on ``mesh``, so the jitted forward runs
    SPMD on the mesh.
    """
    check_fits_mesh(model.cfg, mesh)
    for name, var in model.tensors():
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, param_spec(name))))
    model.inv_freq.set_value(jax.device_put(model.inv_freq.get_value(), NamedSharding(mesh, REPLICATED)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if not (isinstance(sharding, NamedSharding) and sharding.mesh == mesh):
            raise ValueError(f"shard_model: {jax.tree_util.keystr(path)} was not placed on the mesh")
    return model


def model_specs(model: Llama) -> dict[str, P]:
    """``{tensor name: spec}`` actually carried by the model's arrays (what the tests compare to `param_specs`)."""
    return {name: var.get_value().sharding.spec for name, var in model.tensors()}


# ------------------------------------------------------------------------------------------------ cache & activations
def batch_axis(mesh: Mesh, batch: int) -> str | None:
    """``"data"`` when the batch splits evenly over it, else ``None`` (replicate, e.g. batch 1 on data=2)."""
    return DATA if batch % mesh.shape[DATA] == 0 else None


def cache_spec(mesh: Mesh, batch: int) -> P:
    """Spec of one ``[batch, kv_heads, max_len, head_dim]`` cache array: batch over data, KV heads over model."""
    return P(batch_axis(mesh, batch), MODEL, None, None)


def cache_shardings(mesh: Mesh, cfg: LlamaConfig, batch: int) -> KVCache:
    """A `KVCache`-shaped pytree of `NamedSharding` (the length scalar is replicated)."""
    kv = NamedSharding(mesh, cache_spec(mesh, batch))
    layers = tuple(kv for _ in range(cfg.num_layers))
    return KVCache(k=layers, v=layers, length=NamedSharding(mesh, REPLICATED))


def empty_sharded_cache(cfg: LlamaConfig, mesh: Mesh, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """`KVCache.empty`, placed on the mesh by `cache_shardings`."""
    check_fits_mesh(cfg, mesh)
    return jax.device_put(KVCache.empty(cfg, batch, max_len, dtype), cache_shardings(mesh, cfg, batch))


def logits_spec(mesh: Mesh, cfg: LlamaConfig, batch: int) -> P:
    """``[batch, seq, vocab]``: batch over data, vocab over model when ``lm_head`` is vocab-sharded."""
    return P(batch_axis(mesh, batch), None, None if cfg.tie_word_embeddings else MODEL)


def shard_tokens(tokens: jax.Array | np.ndarray, mesh: Mesh) -> jax.Array:
    """Place ``tokens: [batch, seq]`` with the batch over ``"data"`` (replicated over ``"model"``)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return jax.device_put(tokens, NamedSharding(mesh, P(batch_axis(mesh, tokens.shape[0]), None)))


@nnx.jit(static_argnames=("mesh", "attention"))
def sharded_forward(model: Llama, tokens: jax.Array, cache: KVCache, mesh: Mesh,
                    attention: Any = dense_attention) -> tuple[jax.Array, KVCache]:
    """`kascade_lite.model.forward` on a mesh: returns ``(logits [batch, seq, vocab], cache)`` with the output
    shardings pinned to `logits_spec` and `cache_shardings` (so every decode step gets the layout it started with).
    ``model`` is placed by `shard_model`; for Kascade pass ``attention=shard_attention(policy, mesh)``.
    """
    logits, new, _ = model(tokens, cache=cache, attention=attention)
    cache = cache.write(new)
    b = tokens.shape[0]
    logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, logits_spec(mesh, model.cfg, b)))
    cache = jax.lax.with_sharding_constraint(cache, cache_shardings(mesh, model.cfg, b))
    return logits, cache


def greedy_logits(model: Llama, prompt: jax.Array | np.ndarray, steps: int, *, mesh: Mesh | None = None,
                  attention: Any = dense_attention) -> tuple[np.ndarray, np.ndarray]:
    """Prefill ``prompt: [batch, t]`` then decode ``steps`` greedy tokens with the KV cache (`model.decode_steps`).

    With ``mesh`` the model must already be placed (`shard_model`); tokens and cache are placed here and the
    attention is wrapped by `shard_attention` (so Kascade runs per device). Returns
    ``(tokens [batch, t + steps], last-position logits [batch, steps + 1, vocab])`` (the prefill's last position
    first), as NumPy arrays gathered to the host.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    b, t = prompt.shape
    if mesh is None:
        cache = KVCache.empty(model.cfg, b, t + steps, model.dtype)
        step = lambda toks, c: forward(model, toks, c, attention)[:2]  # noqa: E731
    else:
        cache = empty_sharded_cache(model.cfg, mesh, b, t + steps, model.dtype)
        attention = shard_attention(attention, mesh)
        step = lambda toks, c: sharded_forward(model, shard_tokens(toks, mesh), c, mesh, attention)  # noqa: E731
    logits, cache = step(prompt, cache)
    loop = decode_steps(step, logits, cache)
    picked = [next(loop) for _ in range(steps + 1)]  # steps + 1 logits; the token picked from the last is not kept
    tokens = [np.asarray(prompt)] + [np.asarray(tok)[:, None] for tok, _ in picked[:steps]]
    return np.concatenate(tokens, axis=1), np.stack([np.asarray(last) for _, last in picked], axis=1)


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective a compiled HLO module holds (``jitted.lower(...).compile().as_text()``)."""
    ops = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    return {op: len(re.findall(rf"= \S+ {op}(-start)?\(", hlo_text)) for op in ops}


# ------------------------------------------------------------------------------------------------ Kascade head maps
def kv_head_owner(head: int, num_kv_heads: int, model_size: int) -> int:
    """Index along ``"model"`` of the device holding KV head ``head`` (contiguous blocks of Hkv / M heads)."""
    if num_kv_heads % model_size:
        raise ValueError(f"num_kv_heads={num_kv_heads} is not divisible by model axis {model_size}")
    return head // (num_kv_heads // model_size)


def cross_device_reads(schedule: Schedule, model_size: int) -> list[tuple[int, int, int]]:
    """``(layer, kv_head, anchor_kv_head)`` for every reuse head whose Top-k indices live on another device."""
    n = schedule.num_kv_heads
    return [(layer, h, a) for layer, kind in enumerate(schedule.layer_types) if kind == "reuse"
            for h, a in enumerate(schedule.head_map[layer])
            if kv_head_owner(h, n, model_size) != kv_head_owner(a, n, model_size)]


def local_permutation(head_map_row: Sequence[int], num_kv_heads: int, model_size: int) -> tuple[int, ...] | None:
    """A permutation ``perm`` (new slot -> old KV head) of one reuse layer that puts every head on the device of
    the anchor head it reads, or ``None`` when no permutation can (some device would get more than Hkv / M heads).
    """
    per_device = num_kv_heads // model_size
    buckets: list[list[int]] = [[] for _ in range(model_size)]
    for h, a in enumerate(head_map_row):
        buckets[kv_head_owner(a, num_kv_heads, model_size)].append(h)
    if any(len(b) != per_device for b in buckets):
        return None
    return tuple(h for bucket in buckets for h in bucket)


def localize_head_map(schedule: Schedule, model_size: int) -> tuple[Schedule, dict[int, tuple[int, ...]]]:
    """Renumber the KV heads of reuse layers so their head map stays on-device.

    Returns ``(new schedule, {layer: perm})`` where ``perm[new_slot] = old_head``; apply the permutations to the
    weights with `permute_kv_heads` before sharding. Anchor and dense layers keep their numbering. Layers whose
    map cannot be made local (see `local_permutation`) are left as they are and still show in
    `cross_device_reads`: there XLA gathers the small index tensor across devices.
    """
    rows, perms = [list(r) for r in schedule.head_map], {}
    for layer in sorted({layer for layer, _, _ in cross_device_reads(schedule, model_size)}):
        perm = local_permutation(schedule.head_map[layer], schedule.num_kv_heads, model_size)
        if perm is not None:
            perms[layer] = perm
            rows[layer] = [schedule.head_map[layer][old] for old in perm]
    d = schedule.to_dict()
    d["head_map"] = rows
    return Schedule.from_dict(d), perms


def permute_kv_heads(model: Llama, layer: int, perm: Sequence[int]) -> None:
    """Reorder KV head ``perm[s]`` into slot ``s`` in ``layer`` (in place), moving its ``group`` query heads along:
    columns of wq/wk/wv and rows of wo. Attention is computed head by head and ``wo`` sums over heads, so the
    layer's output is unchanged; only the order of its cache heads changes."""
    cfg = model.cfg
    if sorted(perm) != list(range(cfg.num_kv_heads)):
        raise ValueError(f"perm={list(perm)} is not a permutation of {cfg.num_kv_heads} KV heads")
    d, g = cfg.head_dim, cfg.group_size
    kv_idx = (np.asarray(perm)[:, None] * d + np.arange(d)).reshape(-1)
    q_heads = (np.asarray(perm)[:, None] * g + np.arange(g)).reshape(-1)
    q_idx = (q_heads[:, None] * d + np.arange(d)).reshape(-1)
    blk = model.layers[layer]
    blk.wq.set_value(blk.wq.get_value()[:, q_idx])
    blk.wk.set_value(blk.wk.get_value()[:, kv_idx])
    blk.wv.set_value(blk.wv.get_value()[:, kv_idx])
    blk.wo.set_value(blk.wo.get_value()[q_idx, :])


@dataclass(frozen=True)
class ShardedKascade:
    """`KascadeAttention` run per device with `jax.shard_map`: each device scores, selects and attends with its own
    batch rows and KV heads, so anchors and reuse layers need no communication.

    Left to XLA's automatic partitioning, the Top-k and the index gathers of `kascade.py` are not partitioned
    over heads: XLA all-gathers the scores and indices instead (see chapter 09). Here the selection never leaves
    its device, except for reuse heads listed by `cross_device_reads`: for those layers the small index tensor
    ``[batch, kv_heads, sets, n_qtiles, k]`` is all-gathered over ``"model"`` (int32 plus a bool mask) and each
    device picks its rows. ``pool="all"`` (one set shared by every head) needs a cross-head sum and is refused.
    """

    attention: KascadeAttention
    mesh: Mesh

    def __post_init__(self) -> None:
        m = self.mesh.shape[MODEL]
        if self.attention.pool == "all":
            raise ValueError("ShardedKascade: pool='all' sums scores over every KV head; shard with pool='group' "
                             "or 'head'")
        if self.attention.schedule.num_kv_heads % m:
            raise ValueError(f"ShardedKascade: num_kv_heads={self.attention.schedule.num_kv_heads} is not divisible"
                             f" by the model axis ({m})")

    @property
    def heads_per_device(self) -> int:
        return self.attention.schedule.num_kv_heads // self.mesh.shape[MODEL]

    def local_attention(self) -> KascadeAttention:
        """The per-device policy: the same schedule on ``heads_per_device`` heads, remapping done by `_remap`."""
        p = self.heads_per_device
        local = dataclasses.replace(self.attention.schedule, num_kv_heads=p,
                                    head_map=tuple(tuple(range(p)) for _ in self.attention.schedule.head_map))
        return dataclasses.replace(self.attention, schedule=local, remap=False)

    def _remap(self, layer: int, sel: Selection) -> Selection:
        """Inside `shard_map`: the anchor selection rows that this device's KV heads of ``layer`` read."""
        sched, p = self.attention.schedule, self.heads_per_device
        first = jax.lax.axis_index(MODEL) * p
        rows = jax.lax.dynamic_slice_in_dim(jnp.asarray(sched.head_map[layer], jnp.int32), first, p)
        if layer in {lay for lay, _, _ in cross_device_reads(sched, self.mesh.shape[MODEL])}:
            gather = lambda x: jax.lax.all_gather(x, MODEL, axis=1, tiled=True)  # noqa: E731
            sel = dataclasses.replace(sel, idx=gather(sel.idx), keep=gather(sel.keep))
            return sel.remap(rows)
        return sel.remap(rows - first)

    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array,
                 kv_len: jax.Array, carry: Any) -> tuple[jax.Array, Any]:
        sched, local = self.attention.schedule, self.local_attention()
        reuse = sched.layer_types[layer] == "reuse" and self.attention.remap

        def per_device(q, k, v, q_offset, kv_len, carry):
            carry = dict(carry or {})
            if not reuse:
                return local(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=carry)
            anchor = sched.anchor_of[layer]
            seen = {**carry, anchor: self._remap(layer, carry[anchor])}
            return local(layer, q, k, v, q_offset=q_offset, kv_len=kv_len, carry=seen)[0], carry

        bax = batch_axis(self.mesh, q.shape[0])
        q_heads, kv_heads, sel = P(bax, None, MODEL, None), P(bax, MODEL, None, None), P(bax, MODEL)
        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(q_heads, kv_heads, kv_heads, P(), P(), sel),
                             out_specs=(q_heads, sel))(q, k, v, q_offset, kv_len, carry)


def shard_attention(attention: Any, mesh: Mesh) -> Any:
    """The attention to use on ``mesh``: `ShardedKascade` for a `KascadeAttention`, anything else unchanged (dense
    GQA partitions over heads without help)."""
    return ShardedKascade(attention, mesh) if isinstance(attention, KascadeAttention) else attention
