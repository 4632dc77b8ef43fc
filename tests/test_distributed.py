"""Several ranks on loopback: `mlx.launch --backend ring` runs real processes over TCP on
synthetic checkpoints; the pipelined model must give exactly the tokens and logits of one
process, fail with one message when a rank dies or disagrees, and load only its own shards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from serve_helpers import ServeProcess

from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.distributed.split import (
    even_split,
    parse_split,
    proportional_split,
    ranges,
    rank_layers,
)
from kimi_cli.download import select_shards

BIN = Path(sys.executable).parent
LAUNCH = str(BIN / "mlx.launch")
KIMI = str(BIN / "kimi")
SCRIPT = str(Path(__file__).with_name("dist_script.py"))
PROMPT = "258,287,111,40,41"
N_LAYERS = 5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with five layers in several shards (so ranks need different files)."""
    from kimi_cli.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("dist") / "five", "tiny", seed=0,
                            num_hidden_layers=N_LAYERS, shard_bytes=60_000)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dist-home")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("KIMI_", "MLX_"))}
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        e[var] = str(root / var)
    return e


def free_port() -> int:
    """A base port with the next few free too (the ring backend takes one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 60000 and all(_free(port + i) for i in range(1, 4)):
            return port
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(n: int, command: list[str], env: dict[str, str], *mlx_env: str,
           timeout: float = 180) -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring -- COMMAND` (stdin an empty file, as under a script)."""
    args = [LAUNCH, "-n", str(n), "--backend", "ring", "-p", str(free_port())]
    for e in mlx_env:
        args += ["--env", e]
    return subprocess.run([*args, "--", *command], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def script(ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, str(ckpt), PROMPT, "6", *extra]


@pytest.fixture(scope="module")
def one_process(ckpt, env) -> dict:
    r = subprocess.run(script(ckpt), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def rank0_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # rank 0 alone writes
    return json.loads(lines[0])


# ---------------------------------------------------------------------------------------------
# Exact: the pipeline changes where layers run, never a token or a logit


@pytest.mark.parametrize("ranks, split", [(2, "1,4"), (2, "4,1"), (3, "2,1,2")])
def test_pipelined_ranks_give_the_tokens_and_final_logits_of_one_process(
        ckpt, env, one_process, ranks, split):
    got = rank0_json(launch(ranks, script(ckpt), env, f"KIMI_SPLIT={split}"))
    assert got["tokens"] == one_process["tokens"]
    assert got["logits"] == one_process["logits"]


def test_an_expert_cache_on_one_rank_changes_nothing(ckpt, env, one_process):
    got = rank0_json(launch(2, script(ckpt, "1:40%experts"), env, "KIMI_SPLIT=2,3"))
    assert got["tokens"] == one_process["tokens"]
    assert got["logits"] == one_process["logits"]
    assert got["rank0_streams"] is False  # the cache ran on rank 1 only


def test_kimi_run_under_mlx_launch_detects_the_group_and_reports_it(ckpt, env):
    args = ["run", "-m", str(ckpt), "--raw", "-t", "0", "-n", "5", "-f", "json", "abc"]
    alone = subprocess.run([KIMI, *args], env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    assert alone.returncode == 0, alone.stderr
    r = launch(2, [KIMI, *args, "--split", "3,2"], env)
    doc = rank0_json(r)
    assert doc["token_ids"] == json.loads(alone.stdout)["token_ids"]
    d = doc["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "ring"
    assert [(x["start"], x["end"]) for x in d["ranks"]] == [(0, 2), (3, 4)]
    assert all(x["memory_bytes"] > 0 and x["compute_ms_per_token"] > 0 for x in d["ranks"])
    # per decode token: a header and a hidden state (64 float32) to rank 1, the logits back
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert d["comm_bytes_per_token"] == 6 * 4 + 64 * 4 + vocab * 4
    assert d["comm_ms_per_token"] >= 0 and d["decode_tokens"] == 4
    assert "rank 1" not in r.stderr and "WARN" not in r.stderr


def test_piped_context_reaches_rank_0_once_though_mlx_launch_never_closes_stdin(ckpt, env):
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--", KIMI, "run",
           "-m", str(ckpt), "--print-prompt", "the question"]
    r = subprocess.run(cmd, env=env, input="the context\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("the context\n\nthe question") == 1  # rank 0 read it; rank 1 is silent


# ---------------------------------------------------------------------------------------------
# Failures: one message, a bounded time, exit code 1 on rank 0


def _ranks(launcher: int) -> dict[int, int]:
    """pid of each rank mlx.launch started (its children, by their MLX_RANK)."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1]
                                              .split()[1]) != launcher:
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"MLX_RANK="):
                out[int(item[9:])] = int(proc.name)
    return out


def test_a_rank_killed_mid_generation_ends_rank_0_with_one_message_within_30s(ckpt, env):
    # "hello" runs 691 greedy tokens before a stop token on this checkpoint: long enough.
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--", KIMI, "run",
           "-m", str(ckpt), "--raw", "-t", "0", "-f", "jsonl", "hello"]
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()  # a token came out: generation is under way
        assert first.startswith("{"), p.stderr.read()
        os.kill(_ranks(p.pid)[1], signal.SIGKILL)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert '"type": "done"' not in out, "the run was cut short, not finished"
    kimi_lines = [ln for ln in err.splitlines() if ln.startswith("kimi:")]
    assert len(kimi_lines) == 1 and kimi_lines[0].startswith("kimi: error: ")
    assert "another rank" in kimi_lines[0]
    assert "Traceback" not in err, err
    # Exit 1 through its handler, or killed by the backstop when MLX blocked in a recv that
    # never returns (it did, about one run in three): bounded either way.
    assert re.search(r"rank 0 exited with code (1|-9)\b", err), err


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_rank_that_stops_answering_ends_rank_0_within_the_step_timeout(ckpt, env):
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--env",
           "KIMI_DIST_STEP_TIMEOUT=5", "--", KIMI, "run", "-m", str(ckpt), "--raw", "-t", "0",
           "-f", "jsonl", "hello"]
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ranks = {}
    try:
        assert p.stdout.readline().startswith("{"), p.stderr.read()
        ranks = _ranks(p.pid)
        os.kill(ranks[1], signal.SIGSTOP)  # a machine stuck or a link down: no FIN, no reply
        t0 = time.monotonic()
        while _state(ranks[0]) not in ("Z", "gone") and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # rank 0 has gone (the point of the test)
        out, err = p.communicate(timeout=30)
    assert elapsed < 30
    kimi_lines = [ln for ln in err.splitlines() if ln.startswith("kimi:")]
    assert len(kimi_lines) == 1 and "stopped answering" in kimi_lines[0], err
    assert "Traceback" not in err and '"type": "done"' not in out
    # Exit 1 through its handler, or killed by the backstop when MLX blocked in a recv that
    # never returns (it did, about one run in three): bounded either way.
    assert re.search(r"rank 0 exited with code (1|-9)\b", err), err


def test_ranks_with_different_checkpoints_are_refused_at_start(ckpt, env, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in ckpt.iterdir():
        (other / f.name).symlink_to(f)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_theta"] = cfg["rope_theta"] * 2
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(cfg))
    # Each rank resolves its own path: rank 0 the checkpoint, rank 1 the changed one.
    picker = f'exec {KIMI} run -m "$([ "$MLX_RANK" = 0 ] && echo {ckpt} || echo {other})" ' \
             '--raw -n 3 hi'
    r = launch(2, ["sh", "-c", picker], env)
    kimi_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kimi:")]
    assert kimi_lines == [kimi_lines[0]] and "disagree on the checkpoint" in kimi_lines[0], \
        r.stderr
    assert r.stdout.strip() == ""
    assert re.search(r"rank 0 exited with code 1\b", r.stderr)


def test_a_peer_that_never_answers_ends_the_rank_with_a_message(ckpt, env, tmp_path):
    port = free_port()
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    r = subprocess.run([KIMI, "run", "-m", str(ckpt), "hi"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL,
                       env={**env, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts),
                            "KIMI_DIST_CONNECT_TIMEOUT": "3"})
    assert r.returncode == 1
    assert r.stderr.count("kimi: error:") == 1 and "did not answer within 3 s" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


# ---------------------------------------------------------------------------------------------
# The split rule: one place, used by the loader and `kimi download --rank`


def test_auto_split_follows_memory_and_explicit_split_is_checked():
    assert even_split(2, 61) == [31, 30]
    per_layer = [10] * 61
    assert proportional_split([1, 1], per_layer) == [31, 30]
    assert proportional_split([3, 1], per_layer) == [46, 15]
    assert proportional_split([100, 1, 1], [10] * 5) == [3, 1, 1]  # a layer for everyone
    assert parse_split("30,31", 2, 61) == [30, 31] and parse_split("auto", 2, 61) is None
    for bad in ("30", "30,30", "0,61", "x"):
        with pytest.raises(Exception, match="--split"):
            parse_split(bad, 2, 61)


@pytest.mark.parametrize("world, split", [(2, None), (2, "1,4"), (3, "2,2,1")])
def test_download_rank_selects_exactly_the_shards_the_rank_loads(ckpt, world, split):
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    blocks = ranges(parse_split(split, world, N_LAYERS) if split else
                    even_split(world, N_LAYERS), N_LAYERS)
    for rank, block in enumerate(blocks):
        assert rank_layers(rank, world, N_LAYERS, split) == block
        loaded = {f.name for f in open_checkpoint(ckpt, layers=block).files}
        assert set(select_shards(weight_map, block)) == loaded
        assert loaded != set(weight_map.values())


def test_ranks_run_from_their_own_partial_downloads(ckpt, env, tmp_path, one_process):
    """`kimi download --rank I/N --split` against a local Hub; each rank then loads from its
    own folder, which holds only its shards."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import HubRepo, HubServer

    hub = HubRepo("kimi-test/Five-K2", ckpt)
    dirs = []
    with HubServer(hub) as url:
        for rank in (0, 1):
            d = tmp_path / f"rank{rank}"
            r = subprocess.run([KIMI, "download", "kimi-test/Five-K2", "--rank", f"{rank}/2",
                                "--split", "2,3", "--local-dir", str(d), "-q"],
                               env={**env, "HF_ENDPOINT": url}, capture_output=True, text=True,
                               timeout=120, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr
            dirs.append(d)
    shard_sets = [{p.name for p in d.glob("*.safetensors")} for d in dirs]
    assert shard_sets[0] != shard_sets[1]
    picker = (f'exec {sys.executable} {SCRIPT} "$([ "$MLX_RANK" = 0 ] && echo {dirs[0]} || '
              f'echo {dirs[1]})" {PROMPT} 6')
    got = rank0_json(launch(2, ["sh", "-c", picker], env, "KIMI_SPLIT=2,3"))
    assert got["tokens"] == one_process["tokens"] and got["logits"] == one_process["logits"]


# ---------------------------------------------------------------------------------------------
# kimi ... --hostfile: mlx.launch started for the user


def test_hostfile_runs_the_command_on_every_host_and_returns_rank_0s_exit_code(ckpt, env,
                                                                               tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    args = ["run", "-m", str(ckpt), "--raw", "-t", "0", "-n", "4", "-f", "json", "abc"]
    ok = subprocess.run([KIMI, *args, "--hostfile", str(hosts)], env=env, capture_output=True,
                        text=True, timeout=180, stdin=subprocess.DEVNULL)
    doc = rank0_json(ok)
    assert doc["distributed"]["world_size"] == 2 and len(doc["token_ids"]) == 4
    missing = subprocess.run([KIMI, "run", "-m", str(tmp_path / "nowhere"), "hi", "--hostfile",
                              str(hosts)], env=env, capture_output=True, text=True,
                             timeout=180, stdin=subprocess.DEVNULL)
    assert missing.returncode == 1
    assert missing.stderr.count("kimi: error:") == 1 and "no such directory" in missing.stderr
    assert "WARN" not in missing.stderr


def test_a_bad_hostfile_is_a_usage_error(env, tmp_path):
    bad = tmp_path / "hosts.json"
    bad.write_text('{"not": "hosts"}')
    for path in (bad, tmp_path / "absent.json"):
        r = subprocess.run([KIMI, "run", "-m", "demo", "hi", "--hostfile", str(path)], env=env,
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and r.stderr.startswith("kimi: error: --hostfile:"), r.stderr


def test_serve_with_a_hostfile_answers_as_one_process_does_and_stops_on_ctrl_c(ckpt, env,
                                                                                tmp_path):
    alone = subprocess.run([KIMI, "run", "-m", str(ckpt), "--raw", "-t", "0", "-n", "6", "-f",
                            "json", "abc"], env=env, capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
    assert alone.returncode == 0, alone.stderr
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    srv = ServeProcess(["-m", str(ckpt), "--hostfile", str(hosts)], env, timeout=120)
    try:
        assert srv.url, srv.log()
        body = json.dumps({"model": "kimi-k2-thinking", "prompt": "abc", "max_tokens": 6,
                           "temperature": 0}).encode()
        req = urllib.request.Request(srv.url + "/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            doc = json.load(r)
        assert doc["choices"][0]["text"] == json.loads(alone.stdout)["text"]
        refused = subprocess.run([KIMI, "serve", "-m", str(ckpt), "--hostfile", str(hosts),
                                  "--parallel", "2", "--port", "0"], env=env,
                                 capture_output=True, text=True, timeout=120,
                                 stdin=subprocess.DEVNULL)
        assert refused.returncode == 2 and "--parallel" in refused.stderr, refused.stderr
    finally:
        code = srv.stop()
    assert code == 130, srv.log()
    assert "Traceback" not in srv.log()
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"kimi serve .*-m {ckpt}"], capture_output=True,
                          text=True)
    assert left.stdout.strip() == "", "a rank outlived the server"
