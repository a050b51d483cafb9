"""One configuration dataclass for every Llama-family checkpoint we read.

A `LlamaConfig` can be built from a Hugging Face `config.json`, a Meta `params.json`, or (in `checkpoints.py`) GGUF
metadata, and is written next to converted weights as `config.json` in our own flat form (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency scaling (`rope_type: llama3`), Meta's defaults."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters of a Llama-3.x style decoder.

    Attention shapes follow from it: queries `[batch, seq, num_heads, head_dim]`, keys and values head-major
    `[batch, num_kv_heads, seq, head_dim]` (the KV cache: `[batch, num_kv_heads, max_len, head_dim]`);
    `num_heads // num_kv_heads` query heads share one KV head.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig: rope_theta={self.rope_theta} must be positive")

    @property
    def num_parameters(self) -> int:
        """Parameter count: embeddings (and an untied output head), per layer the four attention projections, the
        three MLP matrices and two norms, and the final norm."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * (attention + mlp + 2 * self.hidden_size) + self.hidden_size

    @property
    def group_size(self) -> int:
        """Query heads per KV head (4 for Llama-3.1-8B, 3 for SmolLM2-135M)."""
        return self.num_heads // self.num_kv_heads

    # ----------------------------------------------------------------- our own flat JSON form
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Inverse of `to_dict`; unknown keys are an error (they usually mean a wrong file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LlamaConfig: unknown keys {unknown}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a kascade-lite config ({e})") from e

    # ----------------------------------------------------------------- foreign formats
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From a Hugging Face `config.json` dictionary (`model_type: llama`)."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported architecture model_type={model_type!r} (only 'llama')")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = d.get("rope_theta", rope.get("rope_theta", 10_000.0))
        if rope_type == "llama3":
            scaling: RopeScaling | None = RopeScaling(
                factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        elif rope_type == "default":
            scaling = None
        else:
            raise ValueError(f"unsupported rope_type={rope_type!r} (supported: 'default', 'llama3')")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `LlamaConfig` dictionary describing the same model (used by the reference tests)."""
        d: dict[str, Any] = dict(
            model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu", attention_bias=False,
            mlp_bias=False, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        return d

    @classmethod
    def from_meta_params(cls, p: dict[str, Any], vocab_size: int | None = None) -> "LlamaConfig":
        """From a Meta `params.json` (`dim`, `n_layers`, `n_heads`, `n_kv_heads`, `ffn_dim_multiplier`, ...).

        Meta does not store the MLP width; it is derived exactly as in Meta's reference `model.py`.
        """
        dim, heads = p["dim"], p["n_heads"]
        hidden = int(2 * (4 * dim) / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        multiple = p.get("multiple_of", 256)
        hidden = multiple * ((hidden + multiple - 1) // multiple)
        vocab = vocab_size if vocab_size is not None else p.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            raise ValueError("params.json has no vocab_size; pass it from the embedding shape")
        return cls(
            vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=p["n_layers"],
            num_heads=heads, num_kv_heads=p.get("n_kv_heads") or heads, head_dim=dim // heads,
            rms_norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 10_000.0)),
            rope_scaling=RopeScaling() if p.get("use_scaled_rope") else None,
            max_position_embeddings=int(p.get("max_seq_len", 131_072 if p.get("use_scaled_rope") else 8192)))


LLAMA_3_1_8B = LlamaConfig(
    vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=RopeScaling(),
    max_position_embeddings=131_072, tie_word_embeddings=False, bos_token_id=128_000, eos_token_id=128_009)
"""Llama-3.1-8B(-Instruct): 32 layers, 32 query / 8 KV heads of 128, RoPE θ = 500 000 with llama3 scaling."""

SMOLLM2_135M = LlamaConfig(
    vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rms_norm_eps=1e-5, rope_theta=100_000.0, rope_scaling=None, max_position_embeddings=8192,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
"""SmolLM2-135M-Instruct: 30 layers, 9 query / 3 KV heads of 64, tied embeddings (values from its GGUF metadata)."""

LLAMA_3_1_70B = LlamaConfig(
    vocab_size=128_256, hidden_size=8192, intermediate_size=28_672, num_layers=80, num_heads=64, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=RopeScaling(),
    max_position_embeddings=131_072, tie_word_embeddings=False, bos_token_id=128_000, eos_token_id=128_009)
"""Llama-3.1-70B(-Instruct): 80 layers, 64 query / 8 KV heads of 128, MLP 28 672 (Meta's published config)."""

PRESETS: dict[str, LlamaConfig] = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-3.1-70b": LLAMA_3_1_70B,
                                   "smollm2-135m": SMOLLM2_135M}
