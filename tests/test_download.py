"""`kimi download` against a local Hub: a real HTTP server with the Hub's API shape serving a
synthetic checkpoint, `kimi download` run as a process with HF_ENDPOINT pointing at it.

Covers: only the needed files, hashes checked, a dropped connection resumed with a Range request,
an interrupted run resumed by the next, the free-space refusal, --layers / --rank, offline mode.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import HubRepo, HubServer

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]
REPO = "kimi-test/Tiny-K2"
NEEDED = {"config.json", "generation_config.json", "tokenizer_config.json", "tiktoken.model",
          "chat_template.jinja", "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset split into ~6 shards, plus files a download must skip."""
    from kimi_cli.checkpoint.synthetic import write_checkpoint

    path = write_checkpoint(tmp_path_factory.mktemp("hub") / "repo", "tiny", seed=3,
                            shard_bytes=60_000)
    (path / "modeling_deepseek.py").write_text("# remote code, not needed\n")
    (path / "README.md").write_text("# Tiny-K2\n")
    return path


def shards(release: Path) -> list[str]:
    return sorted(set(json.loads((release / "model.safetensors.index.json").read_text())
                      ["weight_map"].values()))


def hub_env(tmp_path: Path, url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "KIMI_", "XDG_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg-cache"),
               HF_HUB_DISABLE_TELEMETRY="1")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")  # verified markers
    if url:
        env["HF_ENDPOINT"] = url
    env.update(extra)
    return env


def kimi(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def snapshot(tmp_path: Path, hub: HubRepo) -> Path:
    return (tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
            / hub.commit)


def assert_same_files(snap: Path, release: Path, names: set[str]) -> None:
    assert {p.name for p in snap.iterdir()} == names
    for n in names - {".cache"}:
        assert (snap / n).read_bytes() == (release / n).read_bytes(), n


def test_downloads_only_the_needed_files_verified_into_the_hf_cache(release, tmp_path):
    hub = HubRepo(REPO, release)
    with HubServer(hub) as url:
        r = kimi("download", REPO, env=hub_env(tmp_path, url, HF_TOKEN="hf_secret"))
    assert r.returncode == 0, r.stderr
    snap = snapshot(tmp_path, hub)
    assert r.stdout == f"{snap}\n"
    assert_same_files(snap, release, NEEDED | set(shards(release)))
    # sha256 for LFS files, git blob ids for the small ones: every file checked.
    assert f"{len(NEEDED) + len(shards(release))} checked by hash" in r.stderr
    assert (snap.parent.parent / "refs" / "main").read_text() == hub.commit
    fetched = [q for q in hub.requests if "/resolve/" in q.path]
    assert fetched and all(q.authorization == "Bearer hf_secret" for q in fetched)
    assert not any(q.path.endswith((".py", "README.md", "SYNTHETIC")) for q in hub.requests)

    # The cache now serves the repo id offline, to kimi itself.
    offline = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    again = kimi("download", REPO, env=offline)
    assert again.returncode == 0, again.stderr
    assert again.stdout == r.stdout and "HF_HUB_OFFLINE" in again.stderr
    run = kimi("run", "--model", REPO, "hi", "-n", "2", "-t", "0", "-q", env=offline)
    assert run.returncode == 0, run.stderr


def test_verified_shards_are_remembered_and_not_rehashed(release, tmp_path):
    hub = HubRepo(REPO, release)
    env = hub_env(tmp_path)
    with HubServer(hub) as url:
        env["HF_ENDPOINT"] = url
        first = kimi("download", REPO, env=env)
        assert first.returncode == 0, first.stderr
        markers = sorted((tmp_path / "xdg-state" / "kimi-mlx" / "verified").glob("*.json"))
        stamps = [json.loads(m.read_text())["verified_at"] for m in markers]
        again = kimi("download", REPO, "--verify", env=env)
    assert again.returncode == 0, again.stderr
    n = len(shards(release))
    assert len(markers) >= n  # one per LFS blob (the shards, tiktoken.model)
    assert [json.loads(m.read_text())["verified_at"] for m in markers] == stamps  # no rehash
    info = kimi("info", REPO, env={**env, "HF_HUB_OFFLINE": "1"})
    assert info.returncode == 0, info.stderr
    assert f"{n} of {n} shards present" in info.stdout and "all verified" in info.stdout

    # A changed blob loses its marker: it is hashed (and here found bad) again.
    blob = (snapshot(tmp_path, hub) / shards(release)[0]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    info = kimi("info", REPO, env={**env, "HF_HUB_OFFLINE": "1"})
    assert f"{n - 1} verified" in info.stdout, info.stdout


def test_a_connection_dropped_mid_file_resumes_with_a_range_request(release, tmp_path):
    shard = shards(release)[1]
    size = (release / shard).stat().st_size
    hub = HubRepo(REPO, release, drop_once={shard: size // 2})
    with HubServer(hub) as url:
        r = kimi("download", REPO, env=hub_env(tmp_path, url))
    assert r.returncode == 0, r.stderr
    gets = [q for q in hub.requests if q.method == "GET" and q.path.endswith(shard)]
    assert [q.range for q in gets] == [None, f"bytes={size // 2}-"]
    assert (snapshot(tmp_path, hub) / shard).read_bytes() == (release / shard).read_bytes()


def test_an_interrupted_download_resumes_where_it_stopped(release, tmp_path):
    shard = shards(release)[0]
    size = (release / shard).stat().st_size
    hub = HubRepo(REPO, release, stall={shard: size // 3})
    env = hub_env(tmp_path, HF_HUB_DISABLE_PROGRESS_BARS="1")
    blobs = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    with HubServer(hub) as url:
        env["HF_ENDPOINT"] = url
        proc = subprocess.Popen([*KIMI, "download", REPO], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            partial = [p for p in blobs.glob("*.kimi-partial")] if blobs.exists() else []
            if partial and partial[0].stat().st_size >= size // 3:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("the download never reached the stalled shard")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert partial[0].stat().st_size == size // 3  # kept for the next run
        hub.release.set()

        r = kimi("download", REPO, env=env)
    assert r.returncode == 0, r.stderr
    gets = [q for q in hub.requests if q.method == "GET" and q.path.endswith(shard)]
    assert gets[-1].range == f"bytes={size // 3}-"
    assert (snapshot(tmp_path, hub) / shard).read_bytes() == (release / shard).read_bytes()
    assert not list(blobs.glob("*.kimi-partial"))


def test_a_file_that_fails_its_hash_is_removed_and_reported(release, tmp_path):
    bad = shards(release)[2]
    hub = HubRepo(REPO, release, wrong_sha256={bad})
    local = tmp_path / "model"
    with HubServer(hub) as url:
        r = kimi("download", REPO, "--local-dir", str(local), env=hub_env(tmp_path, url))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kimi: error: 1 of ") and bad in last and "sha256" in last
    assert not (local / bad).exists() and not list(local.rglob("*.kimi-partial"))
    assert_same_files(local, release, (NEEDED | set(shards(release))) - {bad} | {".cache"})


def test_not_enough_disk_space_refuses_with_the_numbers(release, tmp_path):
    big = shards(release)[-1]
    hub = HubRepo(REPO, release, sizes={big: 10**15})  # the Hub says 1 PB: no disk has that
    with HubServer(hub) as url:
        r = kimi("download", REPO, env=hub_env(tmp_path, url))
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert re.match(r"kimi: error: not enough free disk space in .+: \d+ files need "
                    r"1000000\.\d\d GB more, [\d.]+ GB are free", line), r.stderr
    assert not any(q.path.endswith(".safetensors") and q.method == "GET" for q in hub.requests)


def expected_shards(release: Path, first: int, last: int) -> set[str]:
    """Independently of the code under test: the shards holding layers first..last, with the
    embedding for layer 0 and norm + lm_head for the last layer."""
    weight_map = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    n_layers = json.loads((release / "config.json").read_text())["num_hidden_layers"]
    out = set()
    for name, shard in weight_map.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            keep = first <= int(m.group(1)) <= last
        elif name.startswith("model.embed_tokens"):
            keep = first == 0
        else:
            keep = last == n_layers - 1
        if keep:
            out.add(shard)
    return out


@pytest.mark.parametrize("flag, first, last", [("--layers=1-1", 1, 1), ("--rank=0/2", 0, 1),
                                                ("--rank=1/2", 2, 2)])
def test_layers_and_rank_fetch_only_the_shards_holding_those_layers(release, tmp_path, flag,
                                                                     first, last):
    hub = HubRepo(REPO, release)
    with HubServer(hub) as url:
        r = kimi("download", REPO, flag, env=hub_env(tmp_path, url))
    assert r.returncode == 0, r.stderr
    want = expected_shards(release, first, last)
    assert want and want != set(shards(release))
    assert_same_files(snapshot(tmp_path, hub), release, NEEDED | want)
    assert f"layers {first}-{last} of 3" in r.stderr


def test_offline_with_an_empty_cache_is_one_clear_error(tmp_path):
    r = kimi("download", REPO, env=hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert r.returncode == 1
    assert r.stderr.startswith("kimi: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_unknown_repo_and_bad_flags(release, tmp_path):
    hub = HubRepo(REPO, release)
    with HubServer(hub) as url:
        missing = kimi("download", "nobody/Nothing", env=hub_env(tmp_path, url))
        bad_rank = kimi("download", REPO, "--rank", "2/2", env=hub_env(tmp_path, url))
    assert missing.returncode == 1 and "not found on the Hub" in missing.stderr
    assert bad_rank.returncode == 2 and "--rank" in bad_rank.stderr
    assert not any("/resolve/" in q.path for q in hub.requests)
