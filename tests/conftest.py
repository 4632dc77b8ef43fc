"""Shared pytest fixtures: small real things on disk (a tokenizer directory), no mocks.

Each fixture builds files in the release's formats so the code under test reads them as it would
read the real checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

# CI may start the suite with SIGINT ignored (as a background job of a non-interactive shell), and
# an ignored signal stays ignored across fork and exec: the CLI under test would never see Ctrl-C.
# Give this process a handler, so the children start with the default disposition a user's has.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox: needs a working sandbox (bubblewrap on Linux); "
                            "in CI (CI=true) a skip of such a test is a failure")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """In CI a sandbox test must run: its skip (no bwrap, no namespaces) fails the suite."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and item.get_closest_marker("sandbox") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"sandbox test skipped in CI (CI={os.environ['CI']}): {reason}"


def write_tiny_tokenizer(path: Path, n_ranks: int = 316) -> int:
    """Write tiktoken.model and tokenizer_config.json into `path`; return the number of ranks."""
    from kimi_cli.checkpoint.synthetic import write_tokenizer_files

    write_tokenizer_files(path, n_ranks=n_ranks)
    return n_ranks


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint-like directory holding only the tokenizer files (read it, don't modify it)."""
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tok_dir: Path):
    from kimi_cli.tokenizer import Tokenizer

    return Tokenizer.from_dir(tok_dir)


# Synthetic checkpoints in the release's exact format (random weights), written once per session.


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (seed 0): a few MB, odd dimensions. Read it, don't modify it."""
    from kimi_cli.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset (seed 1), ~60 MB. Read it, don't modify it."""
    from kimi_cli.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", "small", seed=1)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint directory, for tests that corrupt or edit files."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def corruptible_ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny checkpoint that a test may damage."""
    return copy_checkpoint(tiny_ckpt, tmp_path / "ckpt")


@pytest.fixture
def start(tmp_path: Path, env: dict[str, str]):
    """Start private `kimi serve` processes on scripted outputs (and flags), at a given rate;
    each stops after the test. `env` is the serve test module's own."""
    from serve_helpers import ServeProcess, script_file

    servers: list[ServeProcess] = []

    def _start(outputs: list[str], *flags: str, rate: float = 0) -> ServeProcess:
        spec = script_file(tmp_path / f"s{len(servers)}", outputs) + (f"@{rate}" if rate else "")
        srv = ServeProcess(["--model", spec, *flags], env)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()

