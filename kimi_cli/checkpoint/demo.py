"""The built-in demo model: a small synthetic checkpoint built once under the XDG cache dir.

Lets a fresh install run end to end without the 594 GB download; its weights are random.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import config
from .synthetic import write_checkpoint, write_tokenizer_files

DEMO_NAME = "demo"
DEMO_PRESET = "small"
DEMO_SEED = 0
# Bump when the synthetic format changes so stale demo checkpoints are rebuilt.
DEMO_VERSION = 1


def demo_path() -> Path:
    return config.cache_dir() / "demo" / f"{DEMO_PRESET}-seed{DEMO_SEED}-v{DEMO_VERSION}"


def ensure_demo_model(progress: Callable[[str], None] | None = None) -> Path:
    path = demo_path()
    if (path / "config.json").exists():
        return path
    if progress:
        progress(f"kimi: building the demo checkpoint once in {path} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    import shutil
    import tempfile

    # Several processes may build it at once (the ranks of `mlx.launch -n 2` on one machine):
    # each writes its own directory and the first rename wins.
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".partial-", dir=path.parent))
    built = write_checkpoint(tmp / "demo", DEMO_PRESET, DEMO_SEED)
    try:
        built.rename(path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tokenizer_dir() -> Path:
    """Tokenizer files alone (our tiktoken BPE and the chat template), for scripted models."""
    from importlib import resources

    path = config.cache_dir() / "tokenizer" / f"v{DEMO_VERSION}"
    if (path / "tokenizer_config.json").exists():
        return path
    import shutil
    import tempfile

    # Several processes may build it at once (tests, a shell loop): each writes its own
    # directory and the first rename wins.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".partial-", dir=path.parent))
    write_tokenizer_files(tmp, n_ranks=1501)
    template = resources.files("kimi_cli.chat").joinpath("chat_template.jinja")
    (tmp / "chat_template.jinja").write_text(template.read_text())
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "tokenizer_config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path
