"""Kimi's tiktoken BPE tokenizer, loaded from a checkpoint's tiktoken.model and its config.

Also a streaming detokenizer that turns generated ids into text without splitting UTF-8 characters.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from kimi_cli.chat.template import load_template, render
from kimi_cli.errors import CheckpointError

NUM_SPECIAL_TOKENS = 256

# The release's pre-tokenizer (tokenization_kimi.py). `&&` is class intersection: Han characters
# never join a letter run. tiktoken's regex engine (fancy-regex) supports it; Python's `regex`
# module only does with the V1 flag, and `re` not at all.
SPLIT_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The release encodes in slices like these: tiktoken panics on very long inputs and is quadratic
# on long runs without a split point (openai/tiktoken#195). Same slicing, same ids.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN_CHARS + 1},}}|\S{{{_MAX_RUN_CHARS + 1},}}")

IM_END = "<|im_end|>"


class Tokenizer:
    """Encode/decode for one checkpoint; ids match the release's TikTokenTokenizer."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        name_or_path: str = "",
        chat_template: str | None = None,
    ) -> None:
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.id_to_special = {i: s for s, i in special_tokens.items()}
        self.vocab_size = len(ranks) + NUM_SPECIAL_TOKENS
        self._ranks = ranks
        self._encoding = tiktoken.Encoding(
            name=Path(name_or_path).name or "kimi",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        where = name_or_path or "tokenizer"
        for role, name in (("bos_token", bos_token), ("eos_token", eos_token), ("", IM_END)):
            if name not in self.special_tokens:
                what = f"{role} {name!r}" if role else repr(name)
                raise CheckpointError(
                    f"{where}: special token {what} is not named in tokenizer_config.json"
                )
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = self.special_tokens[bos_token]
        self.eos_id = self.special_tokens[eos_token]
        self.im_end_id = self.special_tokens[IM_END]
        # The chat template ends turns with <|im_end|>; [EOS] ends documents. Stop on either.
        self.stop_ids = {self.im_end_id, self.eos_id}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tiktoken.model` and `tokenizer_config.json` from a checkpoint directory."""
        path = Path(path)
        ranks = _read_ranks(path / "tiktoken.model")
        config = _read_json(path / "tokenizer_config.json")
        specials = _special_tokens(config, len(ranks), path / "tokenizer_config.json")
        return cls(
            ranks,
            specials,
            bos_token=_token_name(config.get("bos_token")) or "[BOS]",
            eos_token=_token_name(config.get("eos_token")) or "[EOS]",
            name_or_path=str(path),
            chat_template=load_template(path),
        )

    # mlx-lm and transformers spell these differently; both read the same ids.
    @property
    def eos_token_id(self) -> int:
        return self.eos_id

    @property
    def bos_token_id(self) -> int:
        return self.bos_id

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.stop_ids)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self, text: str, allow_special: bool = True, add_special_tokens: bool = False
    ) -> list[int]:
        """Token ids for `text`; special-token strings become their single control id.

        With `allow_special=False` they are encoded as plain text (for untrusted input).
        `add_special_tokens` is accepted for mlx-lm/transformers callers: Kimi adds no BOS either
        way, like the release's tokenizer.
        """
        encode = self._encode_with_special if allow_special else self._encoding.encode_ordinary
        ids: list[int] = []
        for piece in _slices(text):
            ids.extend(encode(piece))
        return ids

    def _encode_with_special(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`; special tokens appear as their names (`<think>`, `<|im_end|>`, ...)."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.id_to_special]
        return self._encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special token's name for special ids)."""
        return self._encoding.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.id_to_special

    def get_vocab(self) -> dict[str, int]:
        """Name -> id for special tokens and every BPE token that is whole UTF-8 text.

        mlx-lm looks markers like `<think>` up here; byte fragments have no text name.
        """
        vocab: dict[str, int] = {}
        for token, rank in self._ranks.items():
            try:
                vocab[token.decode("utf-8")] = rank
            except UnicodeDecodeError:
                continue
        vocab.update(self.special_tokens)
        return vocab

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **_: object,
    ) -> list[int] | str:
        """The prompt for `messages` (ids, or text with tokenize=False), for mlx-lm callers.

        Extra keywords transformers callers pass (enable_thinking, ...) do not apply to Kimi.
        """
        text = render(messages, tools, add_generation_prompt, template=self.chat_template)
        return self.encode(text) if tokenize else text


class StreamingDetokenizer:
    """Turns ids fed one at a time into text, never emitting half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        # An incremental decoder holds back only an incomplete trailing sequence, so each token
        # costs its own bytes, not a re-decode of everything so far.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self.last_segment = ""

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        name = self._tokenizer.id_to_special.get(token_id)
        if name is not None:
            # Bytes still pending before a control token can never complete: flush them.
            out = self._decoder.decode(b"", final=True) + name
            self._decoder.reset()
        else:
            out = self._decoder.decode(self._tokenizer.token_bytes(token_id))
        return self._emit(out)

    def finalize(self) -> str:
        """Flush what is pending (invalid trailing bytes become U+FFFD); the stream may go on."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return self._emit(out)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _emit(self, out: str) -> str:
        if out:
            self._parts.append(out)
        self.last_segment = out
        return out


def _slices(text: str) -> Iterator[str]:
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        chunk = text[start : start + _MAX_ENCODE_CHARS]
        if _LONG_RUN.search(chunk) is None:
            yield chunk  # the common case: nothing to cut
        else:
            yield from _cut_long_runs(chunk)


def _cut_long_runs(s: str) -> Iterator[str]:
    """Cut `s` so no slice holds more than _MAX_RUN_CHARS whitespace or non-whitespace in a row."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > _MAX_RUN_CHARS:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


def _read_ranks(path: Path) -> dict[bytes, int]:
    # Same format as tiktoken.load.load_tiktoken_bpe, parsed here because that function copies
    # local files into a cache keyed by path, which serves stale ranks if the file is replaced.
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the tokenizer needs it)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    lines = 0
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(
                f"{path}: line {lineno} is not 'base64-token rank'; the file is corrupt"
            ) from None
    if not ranks:
        raise CheckpointError(f"{path}: no tokens in the file; it is empty or truncated")
    if len(ranks) != lines or set(ranks.values()) != set(range(len(ranks))):
        raise CheckpointError(
            f"{path}: tokens and ranks must be unique and numbered 0..{lines - 1}; the file is corrupt"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # tiktoken cannot encode text holding a byte it has no token for.
        raise CheckpointError(
            f"{path}: single-byte token 0x{missing[0]:02x} missing ({len(missing)} of 256); "
            "not a byte-level BPE file"
        )
    return ranks


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the tokenizer needs it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return config


def _special_tokens(config: dict, n_ranks: int, path: Path) -> dict[str, int]:
    """Names for ids n_ranks .. n_ranks+255: from added_tokens_decoder, else reserved names."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{path}: added_tokens_decoder must be an object of id -> token")
    names = {i: f"<|reserved_token_{i}|>" for i in range(n_ranks, n_ranks + NUM_SPECIAL_TOKENS)}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if token_id not in names or not isinstance(content, str) or not content:
            raise CheckpointError(
                f"{path}: added_tokens_decoder entry {key!r} is not a named special token "
                f"with an id in {n_ranks}..{n_ranks + NUM_SPECIAL_TOKENS - 1} "
                f"(tiktoken.model has {n_ranks} ranks)"
            )
        names[token_id] = content
    specials = {name: i for i, name in names.items()}
    if len(specials) != len(names):
        raise CheckpointError(f"{path}: added_tokens_decoder names a special token twice")
    return specials


def _token_name(value: object) -> str | None:
    # transformers writes bos/eos either as a plain string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
