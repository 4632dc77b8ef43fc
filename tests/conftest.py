"""Shared pytest fixtures: small real things on disk (a tokenizer directory), no mocks.

Each fixture builds files in the release's formats so the code under test reads them as it would
read the real checkpoint.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

# Offsets from the first special id (len(ranks)), as in the release's tokenizer_config.json.
_SPECIAL_NAMES = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    22: "<think>",
    23: "</think>",
    254: "[UNK]",
    255: "[PAD]",
}

_CORPUS = """
Hello, World! The weather in Beijing is sunny, the weather in Paris is rainy.
I think the answer is 42. Let me check the file with the shell tool: ls -la
{"city": "Beijing", "cmd": "ls", "timeout": 30}
你好世界，今天天气很好。北京的天气怎么样？ 🙂 naïve café, Straße.
def main():\n    return 0
"""


def _train_merges(text: str, n_merges: int) -> list[bytes]:
    """Byte-level BPE: the most frequent adjacent pair inside a word becomes the next token."""
    words = Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    merges: list[bytes] = []
    known = {bytes([b]) for b in range(256)}
    while len(merges) < n_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[a, b] += words[w]
        best = next((p for p, _ in pairs.most_common() if p[0] + p[1] not in known), None)
        if best is None:
            break
        merged = best[0] + best[1]
        known.add(merged)
        merges.append(merged)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def write_tiny_tokenizer(path: Path, n_merges: int = 60) -> int:
    """Write tiktoken.model and tokenizer_config.json into `path`; return the number of ranks."""
    tokens = [bytes([b]) for b in range(256)] + _train_merges(_CORPUS, n_merges)
    path.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(tokens)
    decoder = {
        str(n + off): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for off, name in _SPECIAL_NAMES.items()
    }
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 262144,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return n


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
