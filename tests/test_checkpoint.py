"""The synthetic checkpoint writer, and the loader's errors on damaged or unsupported checkpoints.

Every error a user can cause is one CheckpointError whose message names the file at fault.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kimi_cli
from kimi_cli.checkpoint.layout import expert_specs
from kimi_cli.checkpoint.reader import DTYPE_SIZES, read_safetensors_header
from kimi_cli.checkpoint.synthetic import PRESETS, make_config, write_checkpoint
from kimi_cli.errors import CheckpointError
from kimi_cli.model.args import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{6})\.safetensors")

# Release ids minus the first special id (163584), from the format doc.
RELEASE_SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|im_system|>": 10, "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13, "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15,
    "<|im_middle|>": 17, "<think>": 22, "</think>": 23,
}


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data, indent=2))


def expected_dtypes(name: str) -> set[str]:
    if name.endswith(".weight_packed"):
        return {"I32"}
    if name.endswith(".weight_scale"):
        return {"BF16"}
    if name.endswith(".weight_shape"):
        return {"I64", "I32"}
    if name.endswith(".e_score_correction_bias"):
        return {"F32"}
    return {"BF16"}


# ---------------------------------------------------------------------------------------------
# The synthetic writer


def test_writes_every_release_file(tiny_ckpt: Path):
    for name in ("config.json", "generation_config.json", "tiktoken.model",
                 "tokenizer_config.json", "chat_template.jinja", "model.safetensors.index.json"):
        assert (tiny_ckpt / name).is_file(), name


def test_config_is_kimi_k2_with_release_quantization_config(tiny_ckpt: Path):
    config = read_config(tiny_ckpt)
    assert config["model_type"] == "kimi_k2"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4
    assert weights["group_size"] == 32
    assert weights["symmetric"] is True
    assert weights["strategy"] == "group"
    assert weights["type"] == "int"
    assert q["ignore"] == ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                           r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def test_special_tokens_follow_the_bpe_ranks(tiny_ckpt: Path):
    n_ranks = len((tiny_ckpt / "tiktoken.model").read_text().splitlines())
    assert n_ranks == PRESETS["tiny"].n_ranks
    decoder = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    names = {entry["content"]: int(i) for i, entry in decoder.items()}
    for name, offset in RELEASE_SPECIAL_OFFSETS.items():
        assert names[name] == n_ranks + offset, name
    config = read_config(tiny_ckpt)
    assert config["vocab_size"] == n_ranks + 256
    assert config["bos_token_id"] == n_ranks
    assert config["eos_token_id"] == n_ranks + 2
    generation = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert generation["eos_token_id"] == n_ranks + 2


def test_shards_are_named_like_the_release(tiny_ckpt: Path):
    files = shards(tiny_ckpt)
    assert len(files) >= 2
    matches = [SHARD_NAME.fullmatch(f.name) for f in files]
    assert all(matches), [f.name for f in files]
    assert [int(m[1]) for m in matches] == list(range(1, len(files) + 1))
    assert {int(m[2]) for m in matches} == {len(files)}
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}


def test_tensors_have_release_dtypes(tiny_ckpt: Path):
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    seen = {}
    for f in shards(tiny_ckpt):
        for name, info in read_safetensors_header(f).items():
            assert index["weight_map"][name] == f.name
            assert info.dtype in expected_dtypes(name), f"{name}: {info.dtype}"
            seen[name] = info
    assert seen.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in seen.values())
    assert any(i.dtype == "I32" for i in seen.values())
    assert any(i.dtype == "F32" for i in seen.values())


# The safetensors library (which wrote the release) orders a shard by dtype, descending in its
# enum, then by name; expert streaming relies on that layout, so the synthetic shards match it.
RELEASE_DTYPE_ORDER = {"I64": 0, "F32": 1, "I32": 2, "BF16": 3}


def test_shards_are_laid_out_in_the_release_tensor_order(tiny_ckpt: Path):
    for f in shards(tiny_ckpt):
        infos = sorted(read_safetensors_header(f).values(), key=lambda i: i.offset)
        keys = [(RELEASE_DTYPE_ORDER[i.dtype], i.name) for i in infos]
        assert keys == sorted(keys), f.name
        assert all(a.offset + a.nbytes == b.offset for a, b in zip(infos, infos[1:]))


def test_weight_shape_is_int64_as_in_the_release(tiny_ckpt: Path):
    infos = [i for f in shards(tiny_ckpt) for i in read_safetensors_header(f).values()]
    shapes = [i for i in infos if i.name.endswith(".weight_shape")]
    assert shapes and {i.dtype for i in shapes} == {"I64"}


def test_small_shards_split_experts_across_files(tmp_path: Path):
    path = write_checkpoint(tmp_path / "split", "tiny", seed=0, shard_bytes=30_000)
    files_of: dict[str, set[str]] = {}
    for f in shards(path):
        for name in read_safetensors_header(f):
            if ".mlp.experts." in name:
                files_of.setdefault(".".join(name.split(".")[:6]), set()).add(f.name)
    assert any(len(v) > 1 for v in files_of.values())


def test_same_seed_writes_identical_files(tiny_ckpt: Path, tmp_path: Path):
    again = write_checkpoint(tmp_path / "again", "tiny", seed=0)
    names = sorted(f.name for f in tiny_ckpt.iterdir())
    assert sorted(f.name for f in again.iterdir()) == names
    for name in names:
        assert (again / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name


def test_different_seed_writes_different_weights(tiny_ckpt: Path, tmp_path: Path):
    other = write_checkpoint(tmp_path / "other", "tiny", seed=5)
    for a, b in zip(shards(tiny_ckpt), shards(other), strict=True):
        assert a.read_bytes() != b.read_bytes(), a.name


def test_tiny_preset_is_under_10_mb(tiny_ckpt: Path):
    assert sum(f.stat().st_size for f in tiny_ckpt.iterdir()) < 10_000_000


def test_io_preset_has_the_release_expert_dimensions():
    args = ModelArgs.from_dict(make_config(PRESETS["io"]))
    assert args.hidden_size == 7168
    assert args.moe_intermediate_size == 2048
    specs = {s.name.split(".experts.0.")[1]: s for s in expert_specs(args, 1, 0)}
    assert specs["gate_proj.weight_packed"].shape == (2048, 896)
    assert specs["down_proj.weight_scale"].shape == (7168, 64)
    # One expert (gate + up + down) is 24.77 MB as released.
    nbytes = sum(DTYPE_SIZES[s.dtypes[0]] * math.prod(s.shape) for s in specs.values())
    assert round(nbytes / 1e6, 2) == 24.77


def test_writer_leaves_no_partial_dir(tiny_ckpt: Path, tmp_path: Path):
    assert not list(tiny_ckpt.parent.glob("*.partial"))
    stale = tmp_path / "ckpt.partial"
    stale.mkdir()
    (stale / "junk").write_text("from an interrupted run")
    write_checkpoint(tmp_path / "ckpt", "tiny", seed=0, num_hidden_layers=2)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert not (tmp_path / "ckpt" / "junk").exists()


def test_make_checkpoint_script_applies_overrides(tmp_path: Path):
    out = tmp_path / "made"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(out), "--preset",
         "tiny", "--seed", "4", "--experts", "6", "--layers", "2", "--router-skew", "2.0"],
        capture_output=True, text=True, check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == str(out)
    assert re.fullmatch(r"total bytes: \d+ .*", lines[1])
    assert re.fullmatch(r"expert bytes: \d+ .*", lines[2])
    total, experts = (int(line.split()[2]) for line in lines[1:3])
    assert 0 < experts < total == sum(f.stat().st_size for f in out.iterdir())
    config = read_config(out)
    assert config["n_routed_experts"] == 6
    assert config["num_hidden_layers"] == 2
    assert "seed 4" in (out / "SYNTHETIC").read_text()


# ---------------------------------------------------------------------------------------------
# Loader errors: one CheckpointError naming the file


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        kimi_cli.load(path)
    return str(info.value)


def test_load_can_be_called_twice(tiny_ckpt: Path):
    # Importing the submodule kimi_cli.load rebinds the package attribute `load` to the module.
    first, _ = kimi_cli.load(tiny_ckpt)
    second, _ = kimi_cli.load(tiny_ckpt)
    assert first.args == second.args


def test_missing_directory(tmp_path: Path):
    path = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="no such directory"):
        kimi_cli.load(path)
    assert str(path) in load_error(path)


def test_path_is_a_file(tiny_ckpt: Path):
    path = tiny_ckpt / "config.json"
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a directory")):
        kimi_cli.load(path)


def test_missing_config(corruptible_ckpt: Path):
    path = corruptible_ckpt / "config.json"
    path.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: file is missing")):
        kimi_cli.load(corruptible_ckpt)


def test_invalid_json_config(corruptible_ckpt: Path):
    path = corruptible_ckpt / "config.json"
    path.write_text('{"model_type": "kimi_k2",')
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not valid JSON")):
        kimi_cli.load(corruptible_ckpt)


def test_unsupported_model_type(corruptible_ckpt: Path):
    path = corruptible_ckpt / "config.json"
    edit_json(path, lambda c: c.update(model_type="llama"))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'") as info:
        kimi_cli.load(corruptible_ckpt)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda q: q.update(quant_method="fp8"), id="fp8"),
    pytest.param(lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8),
                 id="8-bit"),
    pytest.param(lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False),
                 id="asymmetric"),
])
def test_unsupported_quantization(corruptible_ckpt: Path, edit):
    path = corruptible_ckpt / "config.json"
    edit_json(path, lambda c: edit(c["quantization_config"]))
    with pytest.raises(CheckpointError, match="unsupported quantization") as info:
        kimi_cli.load(corruptible_ckpt)
    assert str(path) in str(info.value)


def test_missing_quantization_config(corruptible_ckpt: Path):
    edit_json(corruptible_ckpt / "config.json", lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        kimi_cli.load(corruptible_ckpt)


def test_missing_shard(corruptible_ckpt: Path):
    shard = shards(corruptible_ckpt)[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: shard file is missing")):
        kimi_cli.load(corruptible_ckpt)


def test_truncated_shard(corruptible_ckpt: Path):
    shard = shards(corruptible_ckpt)[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: truncated")) as info:
        kimi_cli.load(corruptible_ckpt)
    assert "re-download" in str(info.value)


def test_corrupt_shard_header(corruptible_ckpt: Path):
    shard = shards(corruptible_ckpt)[0]
    with open(shard, "r+b") as f:
        f.write((2**63).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: corrupt safetensors header")):
        kimi_cli.load(corruptible_ckpt)


def test_tensor_missing_from_index(corruptible_ckpt: Path):
    index = corruptible_ckpt / "model.safetensors.index.json"
    name = "model.layers.1.mlp.experts.4.up_proj.weight_scale"
    edit_json(index, lambda i: i["weight_map"].pop(name))
    with pytest.raises(CheckpointError, match=re.escape(f"{index}: tensor {name} is missing")):
        kimi_cli.load(corruptible_ckpt)


def test_tensor_missing_from_shard(corruptible_ckpt: Path):
    index = corruptible_ckpt / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    name = "model.norm.weight"
    wrong = next(f.name for f in shards(corruptible_ckpt) if f.name != weight_map[name])
    edit_json(index, lambda i: i["weight_map"].update({name: wrong}))
    shard = corruptible_ckpt / wrong
    with pytest.raises(CheckpointError,
                       match=re.escape(f"{shard}: tensor {name} is missing from this shard")):
        kimi_cli.load(corruptible_ckpt)


@pytest.mark.parametrize("field,value", [("moe_intermediate_size", 64), ("q_lora_rank", 40)])
def test_shape_disagrees_with_config(corruptible_ckpt: Path, field: str, value: int):
    edit_json(corruptible_ckpt / "config.json", lambda c: c.update({field: value}))
    with pytest.raises(CheckpointError, match=r"has shape \[.*\], expected \[.*\] from config") \
            as info:
        kimi_cli.load(corruptible_ckpt)
    assert re.match(re.escape(str(corruptible_ckpt)) + r"/model-\d{5}-of-\d{6}\.safetensors: ",
                    str(info.value))


def test_tensor_with_wrong_dtype(corruptible_ckpt: Path):
    # A router bias saved as bf16 would silently lose the precision routing depends on.
    import mlx.core as mx

    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    weight_map = json.loads((corruptible_ckpt / "model.safetensors.index.json").read_text())
    shard = corruptible_ckpt / weight_map["weight_map"][name]
    tensors = mx.load(str(shard))
    tensors[name] = tensors[name].astype(mx.float16)
    mx.eval(tensors)
    mx.save_safetensors(str(shard), tensors)
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: tensor {name} has dtype F16")):
        kimi_cli.load(corruptible_ckpt)


@pytest.mark.parametrize("name", ["tiktoken.model", "tokenizer_config.json"])
def test_tokenizer_file_missing(corruptible_ckpt: Path, name: str):
    path = corruptible_ckpt / name
    path.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: missing")):
        kimi_cli.load(corruptible_ckpt)


# ---------------------------------------------------------------------------------------------
# Hub repo ids through the Hugging Face cache


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face cache; also patched into huggingface_hub, which reads the
    environment once at import (mlx-lm has already imported it)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/name" must not exist as a relative path
    return home


def test_repo_id_not_in_cache_says_how_to_download(hf_home: Path):
    with pytest.raises(CheckpointError, match=re.escape("kimi download moonshotai/Kimi-K2-X")):
        kimi_cli.load("moonshotai/Kimi-K2-X")


def test_repo_id_in_cache_loads_its_snapshot(hf_home: Path, tiny_ckpt: Path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--org--tiny-kimi"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_ckpt.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    model, tokenizer = kimi_cli.load("org/tiny-kimi")
    assert model.args == ModelArgs.from_dict(read_config(tiny_ckpt))
    assert Path(tokenizer.name_or_path).resolve() == snapshot.resolve()
