"""The expert pack: `kimi convert` copies every byte to its place, resumes after interruptions,
never leaves a pack that looks complete when it is not, and the reader catches corruption."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kimi_cli.checkpoint.reader import open_checkpoint
from kimi_cli.checkpoint.synthetic import write_checkpoint
from kimi_cli.errors import CheckpointError, KimiError
from kimi_cli.experts.convert import convert, crc32_combine, default_pack_dir
from kimi_cli.experts.pack import (
    PACK_FILE,
    PACK_FORMAT,
    PROGRESS_FILE,
    REGION_NAMES,
    is_pack_dir,
    open_pack,
)

KIMI = [sys.executable, "-m", "kimi_cli.cli"]


def _bits(a: mx.array) -> bytes:
    """An MLX array's raw bytes (bf16 through a 16-bit view: NumPy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _first_shard_bytes(src: Path) -> int:
    ckpt = open_checkpoint(src)
    first = ckpt.files[0]
    return sum(t.nbytes for t in ckpt.tensors.values()
               if t.file == first and not t.name.endswith("weight_shape"))


@pytest.fixture(scope="module")
def tiny_pack(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint converted once, uninterrupted. Read it, don't modify it."""
    dst = tmp_path_factory.mktemp("pack") / "tiny-pack"
    convert(tiny_ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def many_shards_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset cut into ~60 shards of 1 MB: a conversion long enough to interrupt."""
    path = tmp_path_factory.mktemp("ckpt") / "sharded"
    return write_checkpoint(path, "small", seed=2, shard_bytes=1 << 20)


# -- contents ----------------------------------------------------------------------------------


def test_every_expert_block_holds_the_source_tensors_bytes(tiny_ckpt, tiny_pack):
    ckpt = open_checkpoint(tiny_ckpt)
    source = {}
    for f in ckpt.files:
        source.update(mx.load(str(f)))
    pack = open_pack(tiny_pack)
    src_name = {f"{p}.weight": f"{p}.weight_packed" for p in ("gate_proj", "up_proj", "down_proj")}
    src_name.update({f"{p}.scales": f"{p}.weight_scale"
                     for p in ("gate_proj", "up_proj", "down_proj")})
    with pack:
        assert sorted(pack.layers) == [1, 2]
        for layer in pack.layers:
            for e in range(ckpt.args.n_routed_experts):
                block = bytes(pack.read_block(layer, e))
                assert len(block) == pack.expert_bytes
                pos = 0
                for name in REGION_NAMES:
                    r = pack.region(name)
                    assert block[pos:r.offset] == bytes(r.offset - pos)  # zero padding
                    want = _bits(source[f"model.layers.{layer}.mlp.experts.{e}.{src_name[name]}"])
                    assert block[r.offset:r.offset + r.nbytes] == want, (layer, e, name)
                    pos = r.offset + r.nbytes


def test_read_into_fills_the_given_arrays_and_adds_the_missing_regions(tiny_pack):
    with open_pack(tiny_pack) as pack:
        r = pack.region("up_proj.weight")
        slot = np.zeros(r.shape, np.uint32)
        dest = {"up_proj.weight": slot}
        assert pack.read_into(2, 7, dest) == pack.expert_bytes
        block = bytes(pack.read_block(2, 7))
        assert dest["up_proj.weight"] is slot
        assert slot.tobytes() == block[r.offset:r.offset + r.nbytes]
        s = pack.region("down_proj.scales")
        assert dest["down_proj.scales"].dtype == np.uint16
        assert dest["down_proj.scales"].shape == s.shape
        assert dest["down_proj.scales"].tobytes() == block[s.offset:s.offset + s.nbytes]


def test_resident_file_loads_with_mlx_and_equals_the_non_expert_tensors(tiny_ckpt, tiny_pack):
    ckpt = open_checkpoint(tiny_ckpt)
    resident = mx.load(str(tiny_pack / "resident.safetensors"))
    names = [n for n in ckpt.tensors if ".mlp.experts." not in n]
    assert sorted(resident) == sorted(names)
    source = {}
    for f in ckpt.files:
        source.update(mx.load(str(f)))
    for name in names:
        assert resident[name].dtype == source[name].dtype, name
        assert resident[name].shape == source[name].shape, name
        assert _bits(resident[name]) == _bits(source[name]), name
    assert resident["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32


def test_pack_json_describes_the_layout(tiny_ckpt, tiny_pack):
    meta = json.loads((tiny_pack / PACK_FILE).read_text())
    config_bytes = (tiny_ckpt / "config.json").read_bytes()
    assert meta["format"] == PACK_FORMAT and meta["version"] == 1
    assert meta["source"] == {"path": str(tiny_ckpt.resolve()), "revision": None,
                              "config_sha256": hashlib.sha256(config_bytes).hexdigest()}
    assert meta["alignment"] == 16384
    assert [r["name"] for r in meta["expert_regions"]] == list(REGION_NAMES)
    assert [r["dtype"] for r in meta["expert_regions"]] == ["uint32"] * 3 + ["bfloat16"] * 3
    # tiny: hidden 64, expert width 32, group 32
    assert [r["shape"] for r in meta["expert_regions"]] == [[32, 8], [32, 8], [64, 4],
                                                            [32, 2], [32, 2], [64, 1]]
    assert all(r["offset"] % 4096 == 0 for r in meta["expert_regions"])
    last = meta["expert_regions"][-1]
    assert meta["block_bytes"] == last["offset"] + last["nbytes"]
    assert meta["stride"] % 16384 == 0 and meta["stride"] >= meta["block_bytes"]
    assert set(meta["layers"]) == {"1", "2"}
    for key, entry in meta["layers"].items():
        assert entry["file"] == f"experts/layer-{int(key):03d}.bin"
        assert entry["n_experts"] == 10 and len(entry["checksums"]) == 10
        data = (tiny_pack / entry["file"]).read_bytes()
        assert len(data) == 10 * meta["stride"]
        for e, crc in enumerate(entry["checksums"]):
            start = e * meta["stride"]
            assert zlib.crc32(data[start:start + meta["block_bytes"]]) == crc
    assert meta["resident"]["file"] == "resident.safetensors"
    assert meta["resident"]["nbytes"] == (tiny_pack / "resident.safetensors").stat().st_size
    for name in ("config.json", "generation_config.json", "tiktoken.model",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (tiny_pack / name).read_bytes() == (tiny_ckpt / name).read_bytes()
    assert not (tiny_pack / PROGRESS_FILE).exists()
    assert is_pack_dir(tiny_pack)


def test_reads_that_bypass_the_page_cache_return_the_same_bytes(tiny_pack):
    with open_pack(tiny_pack) as cached, open_pack(tiny_pack, page_cache=False) as direct:
        for layer in cached.layers:
            for e in range(10):
                assert bytes(direct.read_block(layer, e)) == bytes(cached.read_block(layer, e))


def test_pack_exposes_the_model_args(tiny_ckpt, tiny_pack):
    with open_pack(tiny_pack) as pack:
        assert pack.args == open_checkpoint(tiny_ckpt).args
        assert pack.layer_file(1) == tiny_pack / "experts" / "layer-001.bin"
        assert pack.stride == 32768


def test_hf_snapshot_records_its_revision_and_packs_go_to_the_cache(tiny_ckpt, tmp_path,
                                                                    monkeypatch):
    snap = tmp_path / "hub" / "models--acme--kimi" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_ckpt, snap)
    monkeypatch.delenv("KIMI_MLX_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    dst = default_pack_dir(snap)
    assert dst == tmp_path / "xdg" / "kimi-mlx" / "packs" / "acme--kimi"
    assert default_pack_dir("acme/kimi") == dst
    assert default_pack_dir(tiny_ckpt) == tiny_ckpt.resolve().with_name("tiny-pack")
    convert(snap, dst)
    assert json.loads((dst / PACK_FILE).read_text())["source"]["revision"] == "0123abcd"


def test_crc32_combine_matches_zlib():
    rng = np.random.default_rng(0)
    for n1, n2 in [(0, 5), (1, 1), (1000, 4096), (12345, 1 << 20)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)


# -- refusing -----------------------------------------------------------------------------------


def test_converting_onto_a_complete_pack_refuses_without_force(tiny_ckpt, tiny_pack, tmp_path):
    before = _tree(tiny_pack)
    with pytest.raises(KimiError, match="already converted.*--force"):
        convert(tiny_ckpt, tiny_pack)
    assert _tree(tiny_pack) == before
    dst = tmp_path / "again"
    shutil.copytree(tiny_pack, dst)
    result = convert(tiny_ckpt, dst, force=True)
    assert len(result.shards_converted) == len(open_checkpoint(tiny_ckpt).files)
    assert _tree(dst) == before


def test_a_non_empty_directory_that_is_not_a_pack_is_never_touched(tiny_ckpt, tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(KimiError, match="not empty and is not an expert pack"):
            convert(tiny_ckpt, dst, force=force)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]


def test_a_pack_is_not_accepted_as_a_source(tiny_pack, tmp_path):
    with pytest.raises(KimiError, match="already an expert pack"):
        convert(tiny_pack, tmp_path / "again")


def test_short_disk_space_is_refused_before_writing_anything(tiny_ckpt, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    dst = tmp_path / "out" / "pack"
    with pytest.raises(KimiError, match=r"needs \d+\.\d\d GB more, 0\.00 GB are free") as err:
        convert(tiny_ckpt, dst)
    assert "disk space" in str(err.value)
    assert not (tmp_path / "out").exists()


# -- interruptions ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_an_interrupted_conversion_resumes_to_an_identical_pack(tiny_ckpt, tiny_pack, tmp_path):
    dst = tmp_path / "pack"
    first = _first_shard_bytes(tiny_ckpt)

    def stop_after_first_shard(done, total, elapsed):
        if done > first:  # in the second shard, after the first was recorded
            raise _Stop

    with pytest.raises(_Stop):
        convert(tiny_ckpt, dst, progress=stop_after_first_shard)
    assert not (dst / PACK_FILE).exists()
    assert not is_pack_dir(dst)
    with pytest.raises(CheckpointError, match="incomplete pack: rerun `kimi convert`"):
        open_pack(dst)

    calls = []
    result = convert(tiny_ckpt, dst, progress=lambda *a: calls.append(a))
    names = [f.name for f in open_checkpoint(tiny_ckpt).files]
    assert result.shards_skipped == names[:1]
    assert result.shards_converted == names[1:]
    assert calls[0][0] == first  # progress starts after the finished shard
    assert result.bytes_written == result.bytes_total - first
    assert _tree(dst) == _tree(tiny_pack)
    open_pack(dst).verify()


def test_a_partial_pack_of_another_checkpoint_restarts_cleanly(tiny_ckpt, corruptible_ckpt,
                                                                tiny_pack, tmp_path):
    dst = tmp_path / "pack"
    first = _first_shard_bytes(tiny_ckpt)

    def stop(done, total, elapsed):
        if done > first:  # in the second shard, after the first was recorded
            raise _Stop

    with pytest.raises(_Stop):
        convert(tiny_ckpt, dst, progress=stop)
    other = write_checkpoint(tmp_path / "other", "tiny", seed=5)
    result = convert(other, dst)
    assert result.shards_skipped == []
    fresh = tmp_path / "fresh"
    convert(other, fresh)
    assert _tree(dst) == _tree(fresh)
    assert _tree(dst) != _tree(tiny_pack)


def _start_convert(src: Path, dst: Path) -> subprocess.Popen:
    return subprocess.Popen([*KIMI, "convert", str(src), str(dst)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_finished_shard(proc: subprocess.Popen, dst: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((dst / PROGRESS_FILE).read_text())["finished"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no shard finished in time")


def test_a_killed_conversion_is_not_a_pack_and_a_rerun_completes(many_shards_ckpt, tmp_path):
    dst = tmp_path / "pack"
    proc = _start_convert(many_shards_ckpt, dst)
    _wait_for_finished_shard(proc, dst)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dst / PACK_FILE).exists()
    with pytest.raises(CheckpointError, match="incomplete pack"):
        open_pack(dst)
    result = convert(many_shards_ckpt, dst)
    assert result.shards_skipped  # resumed, not restarted
    with open_pack(dst) as pack:
        pack.verify()
    ref = tmp_path / "ref"
    convert(many_shards_ckpt, ref)
    assert _tree(dst) == _tree(ref)


def test_ctrl_c_exits_130_and_keeps_the_progress_for_a_resume(many_shards_ckpt, tmp_path):
    dst = tmp_path / "pack"
    proc = _start_convert(many_shards_ckpt, dst)
    _wait_for_finished_shard(proc, dst)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "to resume" in err
    assert out == ""
    assert json.loads((dst / PROGRESS_FILE).read_text())["finished"]
    assert not (dst / PACK_FILE).exists()
    result = convert(many_shards_ckpt, dst)
    assert result.shards_skipped


# -- corruption ---------------------------------------------------------------------------------


def test_a_corrupted_block_is_reported_by_file_layer_and_expert(tiny_pack, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(tiny_pack, dst)
    with open_pack(dst) as pack:
        layer_file = pack.layer_file(2)
        where = 3 * pack.stride + pack.region("down_proj.scales").offset + 5
    data = bytearray(layer_file.read_bytes())
    data[where] ^= 0x40
    layer_file.write_bytes(data)

    with open_pack(dst) as pack:
        pack.read_block(2, 2)
        pack.read_block(1, 3)
        with pytest.raises(CheckpointError, match=r"layer-002\.bin: layer 2 expert 3 fails"):
            pack.read_block(2, 3)
        with pytest.raises(CheckpointError, match="layer 2 expert 3"):
            pack.read_into(2, 3, {})
        with pytest.raises(CheckpointError, match="layer 2 expert 3"):
            pack.verify()

    proc = subprocess.run([*KIMI, "convert", "--verify", str(dst)], capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert "layer-002.bin: layer 2 expert 3 fails its checksum" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("reconvert") == 1  # the hint once, not once per bad block


def test_a_truncated_layer_file_is_named_when_opening(tiny_pack, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(tiny_pack, dst)
    layer_file = dst / "experts" / "layer-001.bin"
    os.truncate(layer_file, layer_file.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"layer-001\.bin: truncated"):
        open_pack(dst)
    layer_file.unlink()
    with pytest.raises(CheckpointError, match=r"layer-001\.bin: file is missing"):
        open_pack(dst)


def test_a_pack_whose_config_changed_is_refused(tiny_pack, tmp_path):
    dst = tmp_path / "pack"
    shutil.copytree(tiny_pack, dst)
    config = json.loads((dst / "config.json").read_text())
    config["rope_theta"] = 1.0
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: does not match"):
        open_pack(dst)


# -- command line -------------------------------------------------------------------------------


def test_kimi_convert_prints_the_pack_path_and_a_summary(tiny_ckpt, tmp_path):
    dst = tmp_path / "out"
    proc = subprocess.run([*KIMI, "convert", str(tiny_ckpt), str(dst)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{dst}\n"
    assert "converted" in proc.stderr and "MB/s" in proc.stderr and "peak RSS" in proc.stderr
    assert "shard 1/4 model-00001-of-000004.safetensors" in proc.stderr  # not a TTY: per shard
    assert is_pack_dir(dst)
    open_pack(dst).verify()
