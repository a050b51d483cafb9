"""Conversion of every supported checkpoint format, checked against `transformers` logits, plus bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kascade_lite.cli import main as cli_main  # noqa: E402
from kascade_lite.config import LlamaConfig, RopeScaling  # noqa: E402
from kascade_lite.checkpoints import SafetensorsFile  # noqa: E402
from kascade_lite.convert import (  # noqa: E402
    DTYPES, MANIFEST, convert_checkpoint, iter_converted, load_converted, verify_converted, write_converted)
from kascade_lite.model import Llama, expected_shapes, forward  # noqa: E402
from kascade_lite.rope import interleaved_to_half_permutation  # noqa: E402

# A small Llama-3.1-shaped model: GQA 8/2, llama3 RoPE scaling, untied head. intermediate_size is what Meta's
# params.json formula gives for dim=256 (multiple_of=256), so the Meta form describes the same model.
CFG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=32, rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=RopeScaling(),
                  max_position_embeddings=131_072, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24)).astype(np.int64)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.to_hf_dict())).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, hf_model) -> dict[str, Path]:
    """The same weights as HF safetensors, sharded safetensors, pytorch_model.bin and Meta .pth (1 and 2 ranks)."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {name: root / name for name in ("safetensors", "sharded", "bin", "meta", "meta2")}
    hf_model.save_pretrained(paths["safetensors"])
    hf_model.save_pretrained(paths["sharded"], max_shard_size="1MB")
    paths["bin"].mkdir()  # transformers 5 only writes safetensors: write the legacy torch form ourselves
    hf_model.config.to_json_file(paths["bin"] / "config.json")
    torch.save({k: v.contiguous() for k, v in hf_model.state_dict().items()}, paths["bin"] / "pytorch_model.bin")
    write_meta(hf_model, paths["meta"], ranks=1)
    write_meta(hf_model, paths["meta2"], ranks=2)
    return paths


def write_meta(hf_model, out: Path, ranks: int) -> None:
    """Write Meta's `consolidated.NN.pth` + `params.json`: Meta names, interleaved RoPE rows in wq/wk, and with
    ``ranks > 1`` Meta's model-parallel split (column-parallel on dim 0, row-parallel wo/w2 on dim 1)."""
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    inv = np.argsort(interleaved_to_half_permutation(CFG.head_dim))  # half-split -> interleaved, per head

    def to_interleaved(w, heads):
        rows = (np.arange(heads)[:, None] * CFG.head_dim + inv[None, :]).reshape(-1)
        return w[torch.from_numpy(rows)]

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(CFG.num_layers):
        p = f"model.layers.{i}."
        meta[f"layers.{i}.attention.wq.weight"] = to_interleaved(sd[p + "self_attn.q_proj.weight"], CFG.num_heads)
        meta[f"layers.{i}.attention.wk.weight"] = to_interleaved(sd[p + "self_attn.k_proj.weight"], CFG.num_kv_heads)
        for m, h in names.items():
            meta[f"layers.{i}.{m}.weight"] = sd[p + h + ".weight"]
    out.mkdir()
    for rank in range(ranks):
        part = {}
        for k, v in meta.items():
            axis = 1 if k.endswith(("wo.weight", "w2.weight")) else 0
            part[k] = v if v.ndim == 1 else torch.chunk(v, ranks, dim=axis)[rank].clone()
        torch.save(part, out / f"consolidated.{rank:02d}.pth")
    params = {"dim": CFG.hidden_size, "n_layers": CFG.num_layers, "n_heads": CFG.num_heads,
              "n_kv_heads": CFG.num_kv_heads, "vocab_size": CFG.vocab_size, "multiple_of": 256,
              "ffn_dim_multiplier": None, "norm_eps": CFG.rms_norm_eps, "rope_theta": CFG.rope_theta,
              "use_scaled_rope": True}
    (out / "params.json").write_text(json.dumps(params))


def jax_logits(out: Path, **kw) -> np.ndarray:
    model = load_converted(out, **kw)
    return np.asarray(forward(model, jnp.asarray(TOKENS, jnp.int32))[0])


# ------------------------------------------------------------------------------------------------ every format
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "meta", "meta2"])
def test_format_matches_transformers(fmt, ckpts, hf_logits, tmp_path):
    out = convert_checkpoint(ckpts[fmt], tmp_path / "out", progress=False)
    expected = replace(CFG, bos_token_id=None, eos_token_id=None) if fmt.startswith("meta") else CFG
    assert LlamaConfig.load(out / "config.json") == expected  # params.json does not name bos/eos
    assert verify_converted(out)
    np.testing.assert_allclose(jax_logits(out), hf_logits, atol=1e-4, rtol=0)


def test_layout_and_manifest(ckpts, hf_model, tmp_path):
    out = convert_checkpoint(ckpts["safetensors"], tmp_path / "out", progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "embeddings.safetensors", "layer_00.safetensors", "layer_01.safetensors",
                     MANIFEST]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["format_version"] == 1 and manifest["source_format"] == "hf-safetensors"
    layer = manifest["files"]["layer_00.safetensors"]["tensors"]
    assert layer["wq"] == {"shape": [256, 256], "dtype": "F32"}
    assert layer["wk"]["shape"] == [256, 2 * 32]  # KV heads not expanded
    assert manifest["files"]["embeddings.safetensors"]["tensors"]["lm_head"]["shape"] == [256, 512]
    # our files are standard safetensors, and projections are stored [in, out]
    from safetensors import safe_open
    with safe_open(str(out / "layer_00.safetensors"), framework="numpy") as f:
        w_up = f.get_tensor("w_up")
    np.testing.assert_array_equal(w_up, hf_model.model.layers[0].mlp.up_proj.weight.detach().numpy().T)


def test_bfloat16_output(ckpts, hf_logits, tmp_path):
    out = convert_checkpoint(ckpts["safetensors"], tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert SafetensorsFile(out / "layer_00.safetensors").entries["wq"]["dtype"] == "BF16"
    np.testing.assert_allclose(jax_logits(out, param_dtype=jnp.bfloat16), hf_logits, atol=0.05, rtol=0)


def test_layer_by_layer_loading(ckpts, tmp_path):
    out = convert_checkpoint(ckpts["safetensors"], tmp_path / "out", progress=False)
    files = [name for name, _ in iter_converted(out)]
    assert files == ["embeddings.safetensors", "layer_00.safetensors", "layer_01.safetensors"]
    _, layer1 = list(iter_converted(out))[2]
    assert sorted(layer1) == sorted(f"layers.1.{n}" for n in
                                    ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"))


# ------------------------------------------------------------------------------------------------ streamed bf16 loading
def random_converted(out: Path, cfg: LlamaConfig, dtype: str) -> Path:
    """A converted directory of a random `Llama` of ``cfg`` (weights initialised in bfloat16), stored in ``dtype``."""
    weights = dict(Llama(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1)).tensors())
    return write_converted(out, cfg, lambda name, shape: np.asarray(weights[name][...]).astype(DTYPES[dtype]),
                           dtype=dtype, progress=False)


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_bfloat16_load_is_the_files_values(stored, tmp_path):
    from safetensors.numpy import load_file

    out = random_converted(tmp_path / "out", CFG, stored)
    model = load_converted(out, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    on_disk = {}
    for file in sorted(out.glob("*.safetensors")):
        prefix = "" if file.name == "embeddings.safetensors" else f"layers.{int(file.stem.removeprefix('layer_'))}."
        on_disk.update({prefix + k: v for k, v in load_file(file).items()})
    loaded = dict(model.tensors())
    assert sorted(loaded) == sorted(on_disk)
    for name, var in loaded.items():
        assert var[...].dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(var[...]), on_disk[name].astype(ml_dtypes.bfloat16), err_msg=name)
    assert np.isfinite(np.asarray(forward(model, jnp.asarray(TOKENS, jnp.int32))[0])).all()


LOAD_RSS = """
import json, sys
import jax, jax.numpy as jnp
from kascade_lite.convert import load_converted
def status(key): return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
jax.device_put(jnp.ones(3)).block_until_ready()  # start the runtime before the baseline
before = status("VmRSS")
model = load_converted(sys.argv[1], param_dtype=jnp.bfloat16)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""
"""Peak resident memory of loading, in a fresh process. VmHWM, not ``ru_maxrss``: a child's ``ru_maxrss`` starts at
its parent's resident size when it was forked (Linux keeps it across exec), here the whole pytest process."""


def test_bfloat16_load_of_float32_files_holds_no_float32_copy(tmp_path):
    """Loading a float32 checkpoint (~410 MB) in bfloat16, in a fresh process: the peak resident memory grows by
    the bfloat16 model plus less than two float32 layer files (measured: +64 MB). A loader that first collected
    the float32 arrays and then built the model grew by the model plus the whole float32 copy (+480 MB)."""
    cfg = replace(CFG, vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_layers=6, num_heads=8,
                  num_kv_heads=2, head_dim=128)
    rng = np.random.default_rng(0)
    out = write_converted(tmp_path / "out", cfg, lambda name, shape: rng.standard_normal(shape, np.float32),
                          dtype="float32", progress=False)
    res = subprocess.run([sys.executable, "-c", LOAD_RSS, str(out)], capture_output=True, text=True, check=True)
    rss = json.loads(res.stdout)
    model = cfg.num_parameters * 2
    layer = (out / "layer_00.safetensors").stat().st_size
    assert rss["peak"] - rss["before"] < model + 2 * layer, (rss, model, layer)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    out = random_converted(tmp_path / "out", CFG, "bfloat16")
    replace(CFG, intermediate_size=512).save(out / "config.json")
    with pytest.raises(ValueError, match=r"layer_00\.safetensors: tensor w_gate has shape \(256, 768\), "
                                         r"config\.json expects \(256, 512\)"):
        load_converted(out, param_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="not empty"):
        write_converted(out, CFG, lambda name, shape: np.zeros(shape, ml_dtypes.bfloat16), progress=False)


# ------------------------------------------------------------------------------------------------ resume / overwrite
def test_resume_skips_verified_files(ckpts, tmp_path):
    out = convert_checkpoint(ckpts["safetensors"], tmp_path / "out", progress=False)
    kept = (out / "layer_00.safetensors").stat().st_mtime_ns
    (out / "layer_01.safetensors").unlink()
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(ValueError, match="incomplete"):
        load_converted(out)
    convert_checkpoint(ckpts["safetensors"], out, progress=False)
    assert (out / "layer_00.safetensors").stat().st_mtime_ns == kept
    assert verify_converted(out)


def test_refuses_other_model_without_force(ckpts, tmp_path):
    out = convert_checkpoint(ckpts["safetensors"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="different model"):
        convert_checkpoint(ckpts["bin"], out, progress=False)
    with pytest.raises(ValueError, match="different model"):
        convert_checkpoint(ckpts["safetensors"], out, dtype="bfloat16", progress=False)
    convert_checkpoint(ckpts["bin"], out, force=True, progress=False)
    assert json.loads((out / MANIFEST).read_text())["source_format"] == "hf-torch"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no manifest"):
        convert_checkpoint(ckpts["safetensors"], stranger, progress=False)


# ------------------------------------------------------------------------------------------------ bad input
def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_no_complete_output(out: Path) -> None:
    assert not verify_converted(out)
    if out.exists():
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
        with pytest.raises(ValueError):
            load_converted(out)


def test_truncated_safetensors(ckpts, tmp_path):
    src = copy_ckpt(ckpts["safetensors"], tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert_no_complete_output(tmp_path / "out")


def test_corrupt_safetensors_header(ckpts, tmp_path):
    src = copy_ckpt(ckpts["safetensors"], tmp_path / "src")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupt"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_missing_tensor_midway_leaves_incomplete_output(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file
    src = copy_ckpt(ckpts["safetensors"], tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing tensor model\.layers\.1\.mlp\.up_proj"):
        convert_checkpoint(src, out, progress=False)
    assert (out / "layer_00.safetensors").is_file() and not (out / "layer_01.safetensors").exists()
    assert_no_complete_output(out)


def test_shape_mismatch_with_config(ckpts, tmp_path):
    src = copy_ckpt(ckpts["safetensors"], tmp_path / "src")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(hf, intermediate_size=1024)))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert_no_complete_output(tmp_path / "out")


def test_non_float_dtype(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file
    src = copy_ckpt(ckpts["safetensors"], tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, src / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.norm\.weight has dtype I32"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_unsupported_architecture_and_missing_config(ckpts, tmp_path):
    src = copy_ckpt(ckpts["safetensors"], tmp_path / "src")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(hf, model_type="mistral", architectures=["MistralForCausalLM"])))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    (src / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="no such checkpoint"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_truncated_gguf(tmp_path):
    from kascade_lite.data import smollm2_gguf_path
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(smollm2_gguf_path().read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match=r"broken\.gguf"):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    assert_no_complete_output(tmp_path / "out")


def test_truncated_torch_bin(ckpts, tmp_path):
    src = copy_ckpt(ckpts["bin"], tmp_path / "src")
    f = src / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_convert(ckpts, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["convert", str(ckpts["sharded"]), str(out), "--quiet"]) == 0
    assert verify_converted(out)
    assert cli_main(["convert", str(ckpts["bin"]), str(out), "--quiet"]) == 2
    assert "different model" in capsys.readouterr().err


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "kascade_lite.cli", "convert", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--dtype" in res.stdout and "--force" in res.stdout and "SRC" in res.stdout
