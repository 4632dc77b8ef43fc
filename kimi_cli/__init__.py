"""kimi: run Moonshot's Kimi-K2-Thinking locally with MLX.

`kimi_cli.load(path) -> (model, tokenizer)` is the library entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, **options):
    """Load a release-format checkpoint (or a Hub repo id in the HF cache): (model, tokenizer)."""
    from .loader import load as _load

    return _load(path, **options)


__all__ = ["load", "__version__"]
