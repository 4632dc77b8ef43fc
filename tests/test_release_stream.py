"""Streaming routed experts from the release's own shards: identical to resident, from any layout.

A tiny checkpoint whose experts straddle shard boundaries, read directly, through a symlinked
Hugging Face cache snapshot and through the CLI; damaged shards are named before generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import kimi_cli
from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.checkpoint.synthetic import write_checkpoint
from kimi_cli.experts.release import ReleaseSource, expert_runs

PROMPT = [5, 17, 300, 42, 8, 99, 123, 7, 64, 3, 11, 500, 600, 700, 20, 21, 22, 23, 24, 25, 26]
KIMI = [sys.executable, "-m", "kimi_cli.cli"]
REPO = "moonshotai/Kimi-K2-Thinking"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def split_ckpt(tmp_path_factory) -> Path:
    """The tiny preset in 30 kB shards: several experts have tensors in two shards."""
    return write_checkpoint(tmp_path_factory.mktemp("rel") / "split", "tiny", seed=0,
                            shard_bytes=30_000)


def make_hf_cache(src: Path, hub: Path) -> Path:
    """A Hugging Face cache holding `src` as the hub does: snapshot files are symlinks to blobs."""
    repo = hub / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


@pytest.fixture(scope="module")
def hf_hub(split_ckpt, tmp_path_factory) -> Path:
    hub = tmp_path_factory.mktemp("hf") / "hub"
    make_hf_cache(split_ckpt, hub)
    return hub


def run(model, steps: int = 12):
    cache = model.make_cache()
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1]
    out, tokens = [logits], []
    for _ in range(steps):
        y = mx.argmax(logits, axis=-1)
        tokens.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]
        out.append(logits)
    return tokens, mx.concatenate(out)


@pytest.fixture(scope="module")
def resident(split_ckpt):
    model, _ = kimi_cli.load(split_ckpt, expert_cache="off")
    assert model.expert_cache is None
    return run(model)


def test_experts_straddling_shards_take_one_more_read(split_ckpt):
    ckpt = open_checkpoint(split_ckpt)
    runs = {(L, e): expert_runs(ckpt, L, e) for L in (1, 2) for e in range(10)}
    files = {k: {r.file for r in v} for k, v in runs.items()}
    assert any(len(f) == 2 for f in files.values())
    for key, rs in runs.items():
        assert len(rs) <= len(files[key]) + 1  # words and scales: at most two reads per shard
        regions = [name for r in rs for name, _ in r.parts if name is not None]
        assert sorted(regions) == sorted(f"{p}.{k}" for p in ("gate_proj", "up_proj",
                                                               "down_proj")
                                         for k in ("weight", "scales"))


@pytest.mark.parametrize("spec", ["30%experts", "50%experts", "90%experts"])
def test_streaming_from_the_release_is_bit_identical_to_resident(split_ckpt, resident, spec):
    # 30% of 10 experts is 3 slots per layer: top_k, the smallest budget that can run a token.
    model, _ = kimi_cli.load(split_ckpt, expert_cache=spec)
    cache = model.expert_cache
    assert cache is not None and model.expert_plan.source == "release shards"
    assert set(cache.stats.slots.values()) == {int(spec[:2]) // 10}
    tokens, logits = run(model)
    assert tokens == resident[0]
    assert mx.array_equal(logits, resident[1]).item()
    assert cache.stats.to_dict()["misses"] > 0
    cache.close()


def test_any_tensor_order_streams_identically(split_ckpt, resident, tmp_path):
    # The same tensors rewritten by MLX's own writer, which orders them differently from the
    # safetensors library: the ranges come from the headers, whatever the order.
    other = tmp_path / "mlx-order"
    shutil.copytree(split_ckpt, other)
    for shard in sorted(other.glob("*.safetensors")):
        tensors = mx.load(str(shard))
        mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})
    def layout(path: Path) -> list:
        ckpt = open_checkpoint(path)
        return [[(r.file.name, r.offset, r.parts) for r in expert_runs(ckpt, 1, e)]
                for e in range(10)]

    assert layout(other) != layout(split_ckpt)
    model, _ = kimi_cli.load(other, expert_cache="30%experts")
    tokens, logits = run(model)
    assert tokens == resident[0]
    assert mx.array_equal(logits, resident[1]).item()
    model.expert_cache.close()


def test_reads_go_straight_into_the_slot_buffers(split_ckpt):
    ckpt = open_checkpoint(split_ckpt)
    source = ReleaseSource(ckpt, [1])
    info = ckpt.tensors["model.layers.1.mlp.experts.4.up_proj.weight_packed"]
    target = np.zeros(info.shape, np.uint32)  # stands for a slot's packed words
    dest = {"up_proj.weight": target}
    n = source.read_into(1, 4, dest)
    assert dest["up_proj.weight"] is target  # filled in place, not replaced
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        assert target.tobytes() == f.read(info.nbytes)
    assert dest["up_proj.scales"].dtype == np.uint16  # raw bf16 scales, converted by the slot
    assert n >= source.expert_bytes
    source.close()


def test_symlinked_hf_snapshot_streams_identically(hf_hub, resident):
    snap = hf_hub / ("models--" + REPO.replace("/", "--")) / "snapshots" / REV
    assert (snap / "config.json").is_symlink()
    model, _ = kimi_cli.load(snap, expert_cache="30%experts")
    tokens, logits = run(model)
    assert tokens == resident[0]
    assert mx.array_equal(logits, resident[1]).item()
    model.expert_cache.close()


# ---------------------------------------------------------------------------------------------
# Through the CLI


def cli_env(tmp_path: Path, hub: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KIMI_MODEL", "KIMI_MLX_HOME")}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        env[var] = str(tmp_path / var)
    env["HF_HUB_OFFLINE"] = "1"
    if hub is not None:
        env["HF_HUB_CACHE"] = str(hub)
    return env


def kimi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def json_run(model: str, env, *flags: str) -> dict:
    r = kimi("run", "--model", model, "hi", "--format", "json", "-t", "0", "-n", "6", *flags,
             env=env)
    assert r.returncode == 0, r.stderr
    return {"result": json.loads(r.stdout), "stderr": r.stderr}


@pytest.fixture(scope="module")
def cli_resident(split_ckpt, tmp_path_factory):
    env = cli_env(tmp_path_factory.mktemp("home"))
    return json_run(str(split_ckpt), env, "--expert-cache", "off")["result"]


def test_cli_repo_id_streams_from_the_hf_cache(hf_hub, cli_resident, tmp_path):
    out = json_run(REPO, cli_env(tmp_path, hf_hub), "--expert-cache", "30%experts")
    ec = out["result"]["expert_cache"]
    assert out["result"]["token_ids"] == cli_resident["token_ids"]
    assert ec["streaming"] and ec["source"] == "release shards"
    assert ec["slots_per_layer"] == 3 and ec["misses"] > 0
    # One stderr line says what the cache holds.
    lines = [ln for ln in out["stderr"].splitlines() if "expert cache" in ln and "held" in ln]
    assert len(lines) == 1 and "30% of the experts held (3 of 10 per layer" in lines[0]


@pytest.mark.parametrize("spec", ["40MB", "0.5%", "100%experts", "off"])
def test_json_carries_expert_cache_whenever_the_flag_is_given(split_ckpt, cli_resident, spec,
                                                              tmp_path):
    # Every expert of the tiny model fits in each of these: the object says so.
    out = json_run(str(split_ckpt), cli_env(tmp_path), "--expert-cache", spec)["result"]
    assert out["token_ids"] == cli_resident["token_ids"]
    ec = out["expert_cache"]
    assert ec["spec"] == spec and ec["all_layers_fit"] and not ec["streaming"]
    assert ec["experts_held_share"] == 1.0


def test_json_has_no_expert_cache_without_the_flag_when_all_fits(split_ckpt, tmp_path):
    out = json_run(str(split_ckpt), cli_env(tmp_path))["result"]
    assert "expert_cache" not in out


@pytest.mark.parametrize("spec", ["lots", "0%", "150%", "-5GB", "%experts", "12%exp"])
def test_bad_expert_cache_values_are_usage_errors(split_ckpt, spec, tmp_path):
    r = kimi("run", "--model", str(split_ckpt), "hi", "--expert-cache", spec,
             env=cli_env(tmp_path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("kimi: error: --expert-cache") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "25%experts" in r.stderr or "at most 100%" in r.stderr


# ---------------------------------------------------------------------------------------------
# Damaged downloads are named before generation


def damaged_copy(src: Path, dst: Path, how: str) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[2]
    if how == "missing":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)
    return dst, shard.name


@pytest.mark.parametrize("how", ["missing", "truncated"])
@pytest.mark.parametrize("spec", ["off", "30%experts"])
def test_damaged_shard_is_reported_by_name_before_generation(split_ckpt, tmp_path, how, spec):
    path, name = damaged_copy(split_ckpt, tmp_path / "ckpt", how)
    r = kimi("run", "--model", str(path), "hi", "-n", "4", "--expert-cache", spec,
             env=cli_env(tmp_path))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("kimi: error: ") and "Traceback" not in r.stderr
    assert name in r.stderr and ("missing" if how == "missing" else "truncated") in r.stderr
