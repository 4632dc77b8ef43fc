"""`kimi info` run as a process: the architecture from config.json, files present or missing
against the index, the pack, and the fit report, for a release directory, an expert pack, a
Hub id cached with only its config and index (the release's real dimensions), and via the Hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubRepo, HubServer

from kimi_cli.checkpoint.layout import checkpoint_specs
from kimi_cli.checkpoint.reader import DTYPE_SIZES
from kimi_cli.checkpoint.synthetic import make_config, preset
from kimi_cli.experts.convert import default_pack_dir
from kimi_cli.model.args import ModelArgs

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]
RELEASE = "moonshotai/Kimi-K2-Thinking"
# The release's dimensions (docs/kimi-k2-format.md), so the numbers can be checked against it.
RELEASE_DIMS = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=61, num_attention_heads=64, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=384, num_experts_per_tok=8, n_ranks=163584)


def home_env(root: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("KIMI_", "HF_", "XDG_"))}
    e.update(XDG_CACHE_HOME=str(root / "cache"), HF_HOME=str(root / "hf"), **extra)
    return e


def kimi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def info_json(*args: str, env: dict[str, str]) -> dict:
    r = kimi("info", *args, "--format", "json", "--bandwidth", "100", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def release_metadata_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF home holding only config.json and the index of a release-shaped checkpoint (62
    shards of ~9.6 GB, as released), as after fetching just those two files."""
    root = tmp_path_factory.mktemp("info-release")
    config = make_config(preset("io", **RELEASE_DIMS))
    specs = checkpoint_specs(ModelArgs.from_dict(config))
    sizes = [math.prod(s.shape) * DTYPE_SIZES[s.dtypes[0]] for s in specs]
    total = sum(sizes)
    shard_of, shard, filled = {}, 0, 0
    for s, n in zip(specs, sizes):
        if filled + n > total / 61.5 and filled:
            shard, filled = shard + 1, 0
        shard_of[s.name] = shard
        filled += n
    count = shard + 1
    weight_map = {k: f"model-{v + 1:05d}-of-{count:06d}.safetensors"
                  for k, v in shard_of.items()}
    commit = hashlib.sha1(b"release-metadata").hexdigest()
    repo_dir = root / "hf" / "hub" / f"models--{RELEASE.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_release_id_with_only_config_and_index_cached(release_metadata_only):
    env = home_env(release_metadata_only, HF_HUB_OFFLINE="1")
    report = info_json(env=env)  # the default model is the release
    a = report["architecture"]
    assert (a["layers"], a["dense_layers"], a["moe_layers"]) == (61, 1, 60)
    assert (a["routed_experts"], a["experts_per_token"], a["shared_experts"]) == (384, 8, 1)
    assert a["parameters"] == pytest.approx(1.03e12, rel=0.01)
    assert a["active_parameters"] == pytest.approx(32.9e9, rel=0.01)
    assert a["expert_bytes_released"] == 24_772_608  # docs/expert-cache.md
    f = report["files"]
    assert f["shards_present"] == 0 and f["shards"] == 62
    assert "tokenizer_config.json" in f["missing"] and "tiktoken.model" in f["missing"]
    assert f["bytes_missing"] == pytest.approx(594.2e9, rel=1e-3)  # 594.2 GB as released
    assert report["model"]["repo"] == RELEASE
    assert report["pack"]["exists"] is False
    fit = report["fit"]
    size = {"float32": 4, "bfloat16": 2}[fit["dtype"]]
    assert fit["kv_bytes_per_token"] == 576 * 61 * size  # MLA: 576 values per token and layer
    assert fit["kv_bytes"] == fit["kv_bytes_per_token"] * 32768
    assert fit["resident_bytes"] == pytest.approx(23.4e9 * size / 2, rel=0.01)
    if fit["fits"]:
        est = fit["decode_estimate"]
        assert 0 < est["tps_low"] <= est["tps_high"]
    else:
        assert fit["reason"]


def test_text_report_states_what_is_missing_and_the_assumptions(release_metadata_only):
    env = home_env(release_metadata_only, HF_HUB_OFFLINE="1")
    r = kimi("info", RELEASE, "--context", "4096", "--expert-cache", "8%", "--bandwidth", "800",
             "--ssd-gbps", "6", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "61 layers (1 dense, 60 MoE)" in out and "1.03 T total" in out
    assert "0 of 6" in out and "missing" in out
    assert f"kimi convert {RELEASE}" in out
    assert "at 4096 tokens" in out
    if "does not fit" not in out:
        assert "GB/s (given)" in out and "6.0 GB/s (given)" in out and "tok/s" in out


def test_fit_takes_a_share_of_the_experts(release_metadata_only):
    env = home_env(release_metadata_only, HF_HUB_OFFLINE="1")
    r = kimi("info", RELEASE, "--expert-cache", "25%experts", "--bandwidth", "800",
             "--ssd-gbps", "6", "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    fit = json.loads(r.stdout)["fit"]
    # 96 of 384 slots in each of the 60 MoE layers, whatever this machine's memory.
    assert fit["expert_cache_budget"] == 96 * 60 * fit["expert_slot_bytes"]
    assert fit["expert_cache_how"] == "--expert-cache 25%experts"
    if fit["fits"]:
        assert fit["experts_per_layer"] == 96 and fit["expert_share"] == 0.25
    bad = kimi("info", RELEASE, "--expert-cache", "25%exp", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("kimi: error: --expert-cache")


def test_release_dir_with_its_pack_and_a_streamed_fit(tiny_ckpt, tmp_path):
    env = home_env(tmp_path)
    # The default pack goes next to the checkpoint (default_pack_dir): use a private copy.
    release = tmp_path / "tiny"
    subprocess.run(["cp", "-r", str(tiny_ckpt), str(release)], check=True)
    pack = default_pack_dir(release)
    conv = kimi("convert", str(release), env=env)
    assert conv.returncode == 0, conv.stderr

    report = info_json(str(release), env=env)
    assert report["model"]["kind"] == "release"
    files = report["files"]
    assert files["missing"] == [] and files["incomplete"] == []
    assert files["shards_present"] == files["shards"] == 4
    assert files["bytes_on_disk"] == sum(p.stat().st_size for p in release.iterdir()
                                         if p.name != "SYNTHETIC")
    assert report["pack"] == {"path": str(pack), "exists": True,
                              "bytes": sum(p.stat().st_size for p in pack.rglob("*")
                                           if p.is_file())}
    fit = report["fit"]
    assert fit["fits"] and not fit["streamed"]  # a few KB of experts: all resident
    est = fit["decode_estimate"]
    assert est["tps_high"] == pytest.approx(100e9 / est["bytes_per_token"])

    streamed = info_json(str(pack), "--expert-cache", "50KB", env=env)
    assert streamed["model"]["kind"] == "pack" and streamed["files"]["missing"] == []
    sfit = streamed["fit"]
    assert sfit["streamed"] and sfit["experts_per_layer"] == 5 and sfit["expert_share"] == 0.5
    est = sfit["decode_estimate"]
    assert est["hit_rates"] == [0.9, 0.99] and est["ssd"] == "assumed"
    assert est["tps_low"] < est["tps_high"]


def test_a_truncated_shard_is_reported_incomplete(corruptible_ckpt, tmp_path):
    shard = sorted(corruptible_ckpt.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (corruptible_ckpt / "tiktoken.model").unlink()
    report = info_json(str(corruptible_ckpt), env=home_env(tmp_path))
    assert report["files"]["incomplete"] == [shard.name]
    assert report["files"]["missing"] == ["tiktoken.model"]


def test_uncached_repo_is_fetched_as_config_and_index_only(tmp_path):
    from kimi_cli.checkpoint.synthetic import write_checkpoint

    repo = write_checkpoint(tmp_path / "repo", "tiny", seed=5)
    hub = HubRepo("kimi-test/Tiny-K2", repo)
    with HubServer(hub) as url:
        report = info_json("kimi-test/Tiny-K2", env=home_env(tmp_path, HF_ENDPOINT=url))
    fetched = {q.path.rsplit("/", 1)[-1] for q in hub.requests if q.method == "GET"
               and "/resolve/" in q.path}
    assert fetched == {"config.json", "model.safetensors.index.json"}
    assert report["files"]["shards_present"] == 0 and report["files"]["shards"] == 4
    assert report["model"]["commit"] == hub.commit


def test_offline_and_not_cached_is_one_clear_error(tmp_path):
    r = kimi("info", RELEASE, env=home_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert r.returncode == 1
    assert r.stderr.startswith("kimi: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE" in r.stderr and "kimi download" in r.stderr


def test_info_plans_in_the_dtype_the_loader_computes_in():
    from kimi_cli.bench import compute_dtype
    from kimi_cli.loader import default_dtype

    assert compute_dtype() == default_dtype()


def test_unreachable_hub_is_one_line_without_retries(tmp_path):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = kimi("info", RELEASE, env=home_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}"))
    assert r.returncode == 1
    assert r.stderr.startswith("kimi: error: cannot reach the Hub"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # no "Retrying in 8s" lines before it


def test_fit_says_what_a_batch_of_trajectories_costs(release_metadata_only):
    env = home_env(release_metadata_only, HF_HUB_OFFLINE="1")
    r = kimi("info", RELEASE, "--context", "16384", "--trajectories", "4", "--bandwidth", "800",
             "--ssd-gbps", "6", "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    batch, fit = report["batch"], report["fit"]
    # MLA: 576 latent values per token and layer, 61 layers, for each of the 4 sequences.
    assert batch["kv_bytes_per_sequence"] == 576 * 61 * DTYPE_SIZES["F32" if fit["dtype"] ==
                                                                    "float32" else "BF16"] * 16384
    assert batch["kv_bytes"] == 4 * batch["kv_bytes_per_sequence"]
    assert (batch["sequences"], batch["context"]) == (4, 16384)
    huge = kimi("info", RELEASE, "--context", "262144", "--trajectories", "100000",
                "--bandwidth", "800", "--ssd-gbps", "6", env=env)
    assert huge.returncode == 0, huge.stderr
    line = next(x for x in huge.stdout.splitlines() if "batch of 100000" in x)
    assert "of KV cache at 262144 tokens each" in line and "does not fit" in line
    assert kimi("info", RELEASE, "--trajectories", "0", env=env).returncode == 2
