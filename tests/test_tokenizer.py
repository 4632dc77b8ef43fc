"""Tokenizer: release-compatible ids from tiktoken.model + tokenizer_config.json, and streaming decode.

Built on the small tokenizer directory from conftest (byte-level BPE, the release's special tokens).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from kimi_cli.errors import CheckpointError
from kimi_cli.tokenizer import NUM_SPECIAL_TOKENS, Tokenizer


def _write_ranks(path: Path, tokens: list[bytes]) -> None:
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")


def _splitter(tmp_path: Path, tok_dir: Path, pieces: list[str]) -> Tokenizer:
    """A tokenizer whose vocabulary holds each piece whole, so token boundaries show the split."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += list(dict.fromkeys(p.encode() for p in pieces if len(p.encode()) > 1))
    _write_ranks(tmp_path, tokens)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    n_old = min(int(k) for k in config["added_tokens_decoder"])
    config["added_tokens_decoder"] = {
        str(int(k) - n_old + len(tokens)): v for k, v in config["added_tokens_decoder"].items()
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(tmp_path)


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text)]


def _copy(tok_dir: Path, tmp_path: Path) -> Path:
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, tmp_path / name)
    return tmp_path


def test_split_pattern_matches_release_example(tmp_path, tok_dir):
    expected = ["Hello", ",", " World", "!", " ", "你好世界", " I'm", " ", "123", "45"]
    tok = _splitter(tmp_path, tok_dir, expected)
    assert _pieces(tok, "Hello, World! 你好世界 I'm 12345") == expected


def test_split_pattern_keeps_han_out_of_letter_runs(tmp_path, tok_dir):
    # Needs the `&&` class intersection: without it "abc中文" would be one letter run.
    expected = ["abc", "中文", "def", " Straße", "中"]
    tok = _splitter(tmp_path, tok_dir, expected)
    assert _pieces(tok, "abc中文def Straße中") == expected


def test_vocab_is_ranks_plus_256_specials(tokenizer, tok_dir):
    n_ranks = sum(1 for line in (tok_dir / "tiktoken.model").read_text().splitlines() if line)
    assert tokenizer.vocab_size == len(tokenizer) == n_ranks + NUM_SPECIAL_TOKENS
    assert len(tokenizer.special_tokens) == NUM_SPECIAL_TOKENS
    assert tokenizer.bos_id == n_ranks
    assert tokenizer.eos_id == tokenizer.eos_token_id == n_ranks + 1
    assert tokenizer.im_end_id == n_ranks + 2
    assert tokenizer.special_tokens["<think>"] == n_ranks + 22
    assert tokenizer.id_to_special[n_ranks + 5] == f"<|reserved_token_{n_ranks + 5}|>"
    assert tokenizer.stop_ids == tokenizer.eos_token_ids == {n_ranks + 1, n_ranks + 2}
    assert tokenizer.bos_token == "[BOS]"
    assert tokenizer.name_or_path == str(tok_dir)


def test_special_strings_in_text_become_single_control_ids(tokenizer):
    ids = tokenizer.encode("<|im_user|>user<|im_middle|>hi<|im_end|>")
    specials = [i for i in ids if tokenizer.is_special(i)]
    assert specials == [
        tokenizer.special_tokens["<|im_user|>"],
        tokenizer.special_tokens["<|im_middle|>"],
        tokenizer.im_end_id,
    ]
    assert ids[-1] == tokenizer.im_end_id


def test_special_strings_stay_plain_text_when_not_allowed(tokenizer):
    ids = tokenizer.encode("<think>x</think>", allow_special=False)
    assert not any(tokenizer.is_special(i) for i in ids)
    assert tokenizer.decode(ids) == "<think>x</think>"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, World! The weather is sunny.",
        "你好世界，今天天气很好。",
        "emoji 🙂👍🏽 and naïve café",
    ],
)
def test_encode_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_long_runs_round_trip(tokenizer):
    text = "a" * 30_000 + " " * 30_000 + "b"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_keeps_special_tokens_as_text(tokenizer):
    text = "<think>plan</think>answer<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "plananswer"


def test_token_bytes_gives_raw_bytes(tokenizer):
    assert tokenizer.token_bytes(0xE4) == b"\xe4"
    assert tokenizer.token_bytes(tokenizer.im_end_id) == b"<|im_end|>"


def test_apply_chat_template_renders_and_encodes(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")
    assert tokenizer.apply_chat_template(messages) == tokenizer.encode(text)


def test_streaming_detokenizer_never_emits_half_a_character(tokenizer):
    text = "aé你🙂b"
    assert all(tokenizer.token_bytes(b) == bytes([b]) for b in range(256))
    detok = tokenizer.detokenizer()
    emitted = [detok.add_token(b) for b in text.encode()]  # one byte-token at a time
    assert [e for e in emitted if e] == list(text)
    assert detok.finalize() == ""
    assert detok.text == text


def test_streaming_detokenizer_reassembles_bpe_tokens(tokenizer):
    text = "你好世界，今天天气很好。 🙂 Hello, World! <think>x</think>"
    detok = tokenizer.detokenizer()
    out = "".join(detok.add_token(i) for i in tokenizer.encode(text)) + detok.finalize()
    assert out == text == detok.text


def test_special_token_flushes_incomplete_bytes_as_replacement(tokenizer):
    detok = tokenizer.detokenizer()
    assert detok.add_token(0xE4) == ""
    assert detok.add_token(tokenizer.special_tokens["<think>"]) == "\ufffd<think>"


def test_finalize_replaces_truncated_character(tokenizer):
    detok = tokenizer.detokenizer()
    detok.add_token(ord("a"))
    detok.add_token(0xF0)
    detok.add_token(0x9F)
    assert detok.finalize() == "\ufffd"
    assert detok.text == "a\ufffd"


def test_missing_tiktoken_model_names_the_file(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path)
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)


def test_missing_tokenizer_config_names_the_file(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tiktoken.model", tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_rank_line_names_the_file_and_line(tmp_path, tok_dir):
    path = _copy(tok_dir, tmp_path) / "tiktoken.model"
    path.write_text(path.read_text() + "not-base64!! x\n")
    with pytest.raises(CheckpointError, match=r"tiktoken.model: line \d+"):
        Tokenizer.from_dir(tmp_path)


def test_ranks_with_gaps_are_rejected(tmp_path, tok_dir):
    path = _copy(tok_dir, tmp_path) / "tiktoken.model"
    path.write_text(path.read_text() + f"{base64.b64encode(b'zzz').decode()} 99999\n")
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)


def test_missing_single_byte_token_is_rejected(tmp_path, tok_dir):
    _copy(tok_dir, tmp_path)
    _write_ranks(tmp_path, [bytes([b]) for b in range(1, 256)] + [b"\x00\x00"])
    with pytest.raises(CheckpointError, match="single-byte token 0x00"):
        Tokenizer.from_dir(tmp_path)


def test_empty_tiktoken_model_is_rejected(tmp_path, tok_dir):
    (_copy(tok_dir, tmp_path) / "tiktoken.model").write_text("")
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config_names_the_file(tmp_path, tok_dir):
    (_copy(tok_dir, tmp_path) / "tokenizer_config.json").write_text('{"added_tokens_decoder": ')
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_special_token_id_outside_reserved_range_is_rejected(tmp_path, tok_dir):
    path = _copy(tok_dir, tmp_path) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["added_tokens_decoder"]["7"] = {"content": "<oops>"}
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*'7'"):
        Tokenizer.from_dir(tmp_path)


def test_eos_token_that_is_not_a_special_token_is_rejected(tmp_path, tok_dir):
    path = _copy(tok_dir, tmp_path) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["eos_token"] = "<|nope|>"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="eos_token '<\\|nope\\|>'"):
        Tokenizer.from_dir(tmp_path)
