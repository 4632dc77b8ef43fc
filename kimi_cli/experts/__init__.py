"""Routed experts off the resident path: the expert pack on disk and the unified-memory cache.

`pack` is the on-disk format written by `kimi convert`; `convert` writes it; `cache` streams it.
"""
