"""One heavy turn of `kimi chat` (after /heavy N): the trajectories' live table, then the
aggregate in the usual panels; the aggregate is the reply the conversation keeps.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace

from .. import config
from ..chat.template import render
from ..heavy import run_heavy
from .agent_turn import Turn
from .commands import CommandError
from .heavy_view import HeavyView
from .host import ChatHost
from .status import expert_delta, status_line
from .term import is_tty, no_echo


def run_heavy_turn(app: ChatHost, n: int) -> Turn:
    """Answer the session's last (user) message with N trajectories and their aggregate."""
    messages = app.session.prompt_messages()
    tok = app.tokenizer
    used = len(tok.encode(render(messages, template=tok.chat_template)))
    room = config.CONTEXT_LENGTH - used
    if room <= 0:
        raise CommandError(f"the conversation ({used:,} tokens) fills the model's context "
                           f"({config.CONTEXT_LENGTH:,}): /clear starts a new one")
    settings = replace(app.settings, max_tokens=min(app.settings.max_tokens, room))
    view = HeavyView(app.console)
    renderer = app.renderer()
    cache = getattr(app.model, "expert_cache", None)
    before = cache.stats.to_dict(per_layer=False) if cache is not None else None

    def on_aggregate() -> None:
        view.close()
        renderer.waiting("aggregating…")

    result = None
    try:
        with no_echo() if is_tty(sys.stdin) else contextlib.nullcontext():
            result = run_heavy(app.engine, tok, messages, n, settings, on_update=view.update,
                               on_event=renderer.feed, on_aggregate=on_aggregate)
    finally:
        if result is None:
            view.close()
            renderer.finish("error")
    if result.aggregate is None:
        view.close("interrupted")
        renderer.finish("stop")
    else:
        renderer.finish(result.aggregate.finish_reason)
    agg = result.aggregate
    heavy = {"trajectories": [{k: v for k, v in t.to_dict().items() if k != "token_ids"}
                              for t in result.trajectories]}
    after = cache.stats.to_dict(per_layer=False) if cache is not None else None
    experts = expert_delta(before, after)
    gen = sum(len(t.token_ids) for t in result.trajectories)
    if agg is None:
        app.session.append({"role": "assistant", "content": "", "finish_reason": "interrupted",
                            "heavy": heavy})
        app.hint("interrupted: no aggregate (the trajectories are in the session file)")
        return Turn(None, experts, {})
    msg = agg.message()
    msg["heavy"] = heavy
    st = agg.stats
    msg["stats"] = {k: round(v, 4) if isinstance(v, float) else v
                    for k, v in st.to_dict().items()}
    app.session.append(msg)
    app.note(f"heavy: {n} trajectories · {gen:,} tokens in {result.batch_time:.1f}s "
             f"({gen / max(result.batch_time, 1e-9):.1f} tok/s together) · aggregate: "
             + status_line(st, len(result.aggregate_prompt_ids) + st.generation_tokens,
                           app.last_experts))
    return Turn(agg, experts, {"prefilled_tokens": st.prefilled_tokens,
                               "reused_tokens": st.reused_tokens,
                               "generated_tokens": gen + st.generation_tokens,
                               "prompt_time": st.prompt_time,
                               "generation_time": result.batch_time + st.generation_time})
