"""`kimi bench` run as a process on the tiny checkpoint with tiny tests: the llama-bench test
names, every output format, the fields other tools read, mlx-lm in the same run, expert-cache
stats, and the errors. Speeds are not asserted (benchmarks measure; tests check behaviour).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(sys.executable).parent / "kimi"
KIMI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kimi_cli.cli"]
RESULT_FIELDS = {"engine", "test", "n_prompt", "n_gen", "n_depth", "tps_mean", "tps_std",
                 "samples_tps", "repeats", "ttft_ms", "peak_memory_gb", "floor_tps",
                 "achieved_over_floor", "bytes_per_token", "dtype"}
MACHINE_FIELDS = {"chip", "cores", "memory_gb", "backend", "device", "mlx", "mlx_lm",
                  "memory_bandwidth_gbps"}
FAST = ["-p", "8", "-n", "4", "-r", "2", "--bandwidth", "10"]
QUICK = ["-p", "8", "-n", "4", "-r", "1", "--bandwidth", "10"]  # formats: one timed run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bench-home")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("KIMI_", "HF_", "XDG_"))}
    e.update(XDG_CACHE_HOME=str(root / "cache"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    return e


def kimi(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*KIMI, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def compared(tiny_ckpt: Path, env) -> dict:
    r = kimi("bench", "-m", str(tiny_ckpt), *FAST, "-d", "0,16", "--compare", "mlx-lm",
             "-o", "json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_json_has_one_result_per_test_with_the_documented_fields(compared):
    ours = [r for r in compared["results"] if r["engine"] == "kimi"]
    assert [r["test"] for r in ours] == ["pp8", "tg4", "pp8@d16", "tg4@d16"]
    for r in ours:
        assert RESULT_FIELDS <= r.keys()
        assert r["repeats"] == 2 == len(r["samples_tps"])
        assert r["tps_mean"] == pytest.approx(sum(r["samples_tps"]) / 2)
        assert r["tps_mean"] > 0 and r["ttft_ms"] > 0 and r["peak_memory_gb"] > 0
    assert (ours[2]["n_prompt"], ours[2]["n_depth"]) == (8, 16)
    assert (ours[3]["n_gen"], ours[3]["n_depth"]) == (4, 16)
    assert MACHINE_FIELDS <= compared["machine"].keys()
    assert compared["machine"]["memory_bandwidth_gbps"] == 10


def test_decode_tests_report_achieved_over_the_bandwidth_floor(compared):
    for r in compared["results"]:
        if r["test"].startswith("pp"):  # prefill is compute-bound: no memory floor
            assert r["floor_tps"] is None and r["achieved_over_floor"] is None
            continue
        # floor = bandwidth / (weights read per token + KV per cached token x mean depth)
        assert r["floor_tps"] == pytest.approx(10e9 / r["bytes_per_token"])
        assert r["achieved_over_floor"] == pytest.approx(r["tps_mean"] / r["floor_tps"])
    deep = next(r for r in compared["results"] if r["test"] == "tg4@d16")
    shallow = next(r for r in compared["results"] if r["test"] == "tg4")
    assert deep["bytes_per_token"] > shallow["bytes_per_token"]  # more context to read


def test_compare_runs_mlx_lm_on_the_same_tests_and_gives_the_ratio(compared):
    theirs = {r["test"]: r for r in compared["results"] if r["engine"] == "mlx-lm"}
    ours = {r["test"]: r for r in compared["results"] if r["engine"] == "kimi"}
    assert theirs.keys() == ours.keys()
    assert [c["test"] for c in compared["compare"]] == list(ours)
    for c in compared["compare"]:
        assert c["ratio"] == pytest.approx(ours[c["test"]]["tps_mean"] / theirs[c["test"]]
                                           ["tps_mean"])
        assert ours[c["test"]]["vs_mlx_lm"] == c["ratio"]
    assert compared["contenders"]["mlx-lm"]["dtype"] == "bfloat16"


def test_csv_has_a_header_and_a_row_per_test(tiny_ckpt, env):
    r = kimi("bench", "-m", str(tiny_ckpt), *QUICK, "-o", "csv", "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["test"] for row in rows] == ["pp8", "tg4"]
    assert float(rows[1]["tps_mean"]) > 0 and math.isfinite(float(rows[1]["floor_tps"]))
    assert rows[0]["chip"] and rows[0]["backend"] in ("cpu", "metal")


def test_md_is_a_markdown_table_then_the_machine_and_floor(tiny_ckpt, env):
    r = kimi("bench", "-m", str(tiny_ckpt), *QUICK, "-o", "md", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| engine | test | t/s |")
    assert lines[1].startswith("|:---|:---|---:|")
    assert lines[2].startswith("| kimi | pp8 |") and lines[3].startswith("| kimi | tg4 |")
    assert any(line.startswith("machine:") for line in lines)
    assert any(line.startswith("decode floor (kimi") for line in lines)
    assert "kimi bench:" in r.stderr  # progress goes to stderr, never stdout


@pytest.fixture(scope="module")
def pack(tiny_ckpt: Path, env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-pack") / "pack"
    conv = kimi("convert", str(tiny_ckpt), str(path), env=env)
    assert conv.returncode == 0, conv.stderr
    return path


def test_table_default_and_expert_cache_stats_with_jsonl(pack, env):
    r = kimi("bench", "-m", str(pack), *QUICK, "--expert-cache", "50KB", "-o", "jsonl", "-q",
             env=env)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["type"] for x in lines] == ["result", "result", "summary"]
    for x in lines[:2]:
        c = x["expert_cache"]
        assert c["hits"] + c["misses"] > 0 and 0 <= c["hit_rate"] <= 1 and c["tokens"] > 0
    assert lines[2]["model"]["pack"] is True and "results" not in lines[2]

    table = kimi("bench", "-m", str(pack), *QUICK, "--expert-cache", "50KB", "-q", env=env)
    assert table.returncode == 0, table.stderr
    assert "hit rate" in table.stdout and "tg4" in table.stdout
    assert "\x1b[" not in table.stdout  # not a terminal: no colour codes


def test_compare_on_an_expert_pack_is_a_usage_error(pack, env):
    r = kimi("bench", "-m", str(pack), "--compare", "mlx-lm", *QUICK, env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("kimi: error:") and "expert pack" in r.stderr


@pytest.mark.parametrize("args", [["-p", "x"], ["-p", "0", "-n", "0"], ["-r", "0"],
                                  ["--compare", "llama.cpp"]])
def test_bad_flags_are_usage_errors(tiny_ckpt, env, args):
    r = kimi("bench", "-m", str(tiny_ckpt), *args, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("kimi: error:")


def test_batch_sizes_add_one_tg_row_each_against_batch_one(tiny_ckpt, env):
    r = kimi("bench", "-m", str(tiny_ckpt), "-p", "8", "-n", "4", "-d", "0,16", "-b", "1,2,4",
             "-r", "1", "--bandwidth", "10", "--compare", "mlx-lm", "-o", "json", env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ours = [x for x in report["results"] if x["engine"] == "kimi"]
    assert [x["test"] for x in ours] == ["pp8", "tg4", "tg4x2", "tg4x4", "pp8@d16", "tg4@d16",
                                         "tg4@d16x2", "tg4@d16x4"]
    theirs = [x["test"] for x in report["results"] if x["engine"] == "mlx-lm"]
    assert theirs == ["pp8", "tg4", "pp8@d16", "tg4@d16"]  # batches: our cache only
    by = {x["test"]: x for x in ours}
    for name, b in (("tg4x2", 2), ("tg4@d16x4", 4)):
        row = by[name]
        assert row["n_batch"] == b and row["n_gen"] == 4
        assert row["tps_per_sequence"] == pytest.approx(row["tps_mean"] / b)
        base = by[name.split("x")[0]]
        assert row["vs_b1"] == pytest.approx(row["tps_mean"] / base["tps_mean"])
        # The weights are read once per step for all rows: fewer bytes per token than alone.
        assert row["bytes_per_token"] < base["bytes_per_token"]
    assert "vs_b1" not in by["tg4"]


def test_a_batch_size_below_one_is_a_usage_error(tiny_ckpt, env):
    r = kimi("bench", "-m", str(tiny_ckpt), "-b", "0", env=env)
    assert r.returncode == 2 and r.stderr.startswith("kimi: error: -b/--batch")
