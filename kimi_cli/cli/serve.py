"""`kimi serve`: the model behind the OpenAI and Anthropic APIs on a local port.
Loading options as in `run`; the HTTP side lives in `kimi_cli.serve`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import config
from ..errors import UsageError
from .app import app
from .common import (
    _check_expert_cache,
    _distributed,
    _err,
    _errors,
    _loading,
    _read_profile,
    model_dir,
    resolve_model,
)
from .options import (
    DebugOpt,
    ExpertCacheOpt,
    HostfileOpt,
    NoPrefetchOpt,
    PinExpertsOpt,
    SplitOpt,
)


class ReasoningField(str, Enum):
    reasoning_content = "reasoning_content"
    reasoning = "reasoning"
    both = "both"


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="As for `kimi run` (a directory, Hub id, `demo` or "
        "`scripted:FILE[@RATE]`).", envvar="KIMI_MODEL")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on (loopback by default; 0.0.0.0 exposes it to the "
        "network).")] = config.SERVE_HOST,
    port: Annotated[int, typer.Option(
        "--port", "-p", help="Port (0: any free one; the URL is printed).")] = config.SERVE_PORT,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Require this key (`Authorization: Bearer KEY` or `x-api-key`); "
        "other requests get 401.", envvar="KIMI_API_KEY")] = None,
    reasoning_field: Annotated[ReasoningField, typer.Option(
        "--reasoning-field", help="OpenAI field for the reasoning: reasoning_content "
        "(Moonshot, llama-server), reasoning (vLLM, ollama, mlx-lm) or both.")] = (
        ReasoningField.reasoning_content),
    model_name: Annotated[str, typer.Option(
        "--model-name", help="The model id clients send and /v1/models lists.")] = (
        config.SERVE_MODEL_NAME),
    context_limit: Annotated[int | None, typer.Option(
        "--context-limit", help="Prompt plus completion tokens per request; longer requests "
        "get 400.", show_default=f"{config.CONTEXT_LENGTH}, or what the KV cache has room "
        "for")] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests that may wait for the model; one more gets 503.")] = (
        config.SERVE_MAX_QUEUE),
    parallel: Annotated[int | None, typer.Option(
        "--parallel", "-np", help="Sequences decoded at once: concurrent requests (and a "
        "request's n choices) share one batch; 1 runs requests one at a time.",
        show_default=f"as many as fit, up to {config.SERVE_PARALLEL}")] = None,
    expert_cache: ExpertCacheOpt = None,
    no_prefetch: NoPrefetchOpt = False,
    pin_experts: PinExpertsOpt = None,
    split: SplitOpt = None,
    hostfile: HostfileOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Serve the model over HTTP: OpenAI (/v1/chat/completions) and Anthropic (/v1/messages)."""
    with _errors(debug):
        from ..distributed.group import launched

        several = hostfile is not None or launched()  # rank 0 serves, the others follow
        if several and parallel is not None and parallel > 1:  # said before mlx.launch starts
            raise UsageError("--parallel: several machines serve one request at a time "
                             "(batched decoding through a pipeline is not built yet)")
        _distributed(hostfile, split)
        if several:
            parallel = 1
        if not 0 <= port <= 65535:
            raise UsageError("--port must be in 0-65535")
        context_given = context_limit is not None
        context_limit = config.CONTEXT_LENGTH if context_limit is None else context_limit
        for name, value in (("--context-limit", context_limit), ("--max-queue", max_queue),
                            ("--parallel", 1 if parallel is None else parallel)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1")
        if not model_name.strip():
            raise UsageError("--model-name must not be empty")
        _check_expert_cache(expert_cache)
        pinned = _read_profile(pin_experts) if pin_experts else None
        spec = resolve_model(model)
        from ..engine import Engine
        from ..model.scripted import PREFIX, load_scripted
        from ..serve.plan import Served
        from ..serve.server import serve as run_server
        from ..tokenizer import Tokenizer

        if spec.startswith(PREFIX):
            from ..checkpoint.demo import ensure_tokenizer_dir

            tok = Tokenizer.from_dir(ensure_tokenizer_dir())
            mdl = load_scripted(spec, tok)
        else:
            from ..loader import load

            path = model_dir(spec, quiet=False)
            notes: list[str] = []  # printed after the spinner, not through it
            with _loading(path, False):
                mdl, tok = load(path, expert_cache=expert_cache, prefetch=not no_prefetch,
                                pinned=pinned, log=notes.append)
            for note in notes:
                _err(note)
        if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            _err(f"kimi: warning: listening on {host} without --api-key: anyone who can reach "
                 "this port can use the model")
        parallel, context_limit = _batch_plan(mdl, parallel, context_limit, context_given)
        served = Served(tok, model_name, {spec, Path(spec).name}, context_limit,
                        reasoning_field.value, parallel)
        run_server(served, Engine(mdl, tok), host, port, api_key, max_queue, parallel)


def _batch_plan(mdl, parallel: int | None, context: int, context_given: bool) -> tuple[int, int]:
    """(sequences decoded at once, tokens per request) whose KV cache fits beside the weights
    and the expert cache. What the user set is refused if it cannot fit; what they left to us
    shrinks to fit (fewer sequences first, then a shorter context), said in one line."""
    from ..batch import check_batch_fits, max_batch_context

    remedy = "use a lower --parallel, a lower --context-limit or a smaller --expert-cache"
    counts = [parallel] if parallel is not None else range(config.SERVE_PARALLEL, 0, -1)
    for n in counts:
        room = max_batch_context(mdl, n)
        if room is None or room >= context:
            if parallel is None and n < config.SERVE_PARALLEL:
                _err(f"kimi: serving {n} request{'s' * (n > 1)} at a time: that is what the KV "
                     f"cache has room for at {context:,} tokens each (--parallel, "
                     "--context-limit, --expert-cache)")
            return n, context
    n = counts[-1]
    room = max_batch_context(mdl, n)
    if context_given or room < config.SERVE_MIN_CONTEXT:
        check_batch_fits(mdl, n, context, remedy=remedy)  # raises, with the numbers
    _err(f"kimi: requests of up to {room:,} tokens, {n} at a time: that is what the KV cache "
         f"has room for beside the weights and the expert cache (--context-limit, "
         "--parallel, --expert-cache)")
    return n, room
