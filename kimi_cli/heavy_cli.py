"""`kimi run --heavy`: N trajectories and an aggregate, shown live or as plain streams, or as
a JSON document (every trajectory and the aggregate) or JSONL events; Ctrl-C keeps what is done.
"""

from __future__ import annotations

import json
import sys

from .chat.parser import ReasoningDelta, TextDelta
from .engine import Engine, PrefillProgress, SamplingSettings
from .heavy import HeavyResult, run_heavy


def heavy_document(result: HeavyResult, model_name: str) -> dict:
    """The `--format json` document: the final answer's fields as in a plain run (from the
    aggregate), every trajectory, and the aggregate turn."""
    agg = result.aggregate
    doc: dict = {
        "model": model_name,
        "mode": "heavy",
        "text": agg.content if agg else "",
        "reasoning": agg.reasoning if agg else "",
        "finish_reason": agg.finish_reason if agg else "interrupted",
        "prompt_token_ids": result.prompt_ids,
        "trajectories": [t.to_dict() for t in result.trajectories],
        "aggregate": None,
        "batch_seconds": result.batch_time,
        "batch_generation_tokens": sum(len(t.token_ids) for t in result.trajectories),
    }
    doc["batch_tps"] = (doc["batch_generation_tokens"] / result.batch_time
                        if result.batch_time > 0 else 0.0)
    if agg is not None:
        doc["aggregate"] = {"text": agg.content, "reasoning": agg.reasoning,
                            "tokens": len(agg.token_ids), "finish_reason": agg.finish_reason,
                            "prompt_token_ids": result.aggregate_prompt_ids,
                            "token_ids": agg.token_ids, **agg.stats.to_dict()}
    return doc


def run_heavy_command(mdl, tok, question: str, system: str | None, settings: SamplingSettings,
                      n: int, fmt: str, model_name: str, think: str, quiet: bool,
                      color: str = "auto") -> None:
    """Raises KeyboardInterrupt after the output when Ctrl-C stopped the run (exit 130)."""
    from .ui.events import ThinkMode
    from .ui.heavy_view import HeavyView
    from .ui.render import make_renderer
    from .ui.term import make_console

    out = sys.stdout
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": question})
    err_console = make_console(sys.stderr, color)
    view = HeavyView(err_console, quiet=quiet or fmt != "text")
    renderer = None
    if fmt == "text":
        renderer = make_renderer(make_console(out, color), err_console, think=ThinkMode(think),
                                 quiet=quiet)

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    sent: set[int] = set()
    table_up: list[bool] = []

    def on_update(trajs) -> None:
        if not table_up and renderer is not None:
            renderer.finish("stop")  # the prompt's progress gives way to the trajectories
        table_up.append(True)
        view.update(trajs)
        if fmt != "jsonl":
            return
        for t in trajs:
            if t.finish_reason is not None and t.index not in sent:
                sent.add(t.index)
                emit({"type": "trajectory", **t.to_dict()})

    def on_progress(p: PrefillProgress) -> None:
        if renderer is not None:
            renderer.progress(p.processed, p.total)

    def on_aggregate() -> None:
        view.close()
        view.note(f"kimi: aggregating {n} answers")
        if renderer is not None:
            renderer.waiting("aggregating…")

    def on_event(ev) -> None:
        if renderer is not None:
            if isinstance(ev, PrefillProgress):
                renderer.progress(ev.processed, ev.total)
            else:
                renderer.feed(ev)
        elif fmt == "jsonl":
            if isinstance(ev, ReasoningDelta):
                emit({"type": "reasoning", "text": ev.text})
            elif isinstance(ev, TextDelta):
                emit({"type": "text", "text": ev.text})

    try:
        result = run_heavy(Engine(mdl, tok), tok, messages, n, settings,
                           on_update=on_update, on_event=on_event,
                           on_progress=on_progress, on_aggregate=on_aggregate)
    except BaseException:
        view.close()
        if renderer is not None:
            renderer.finish("error")
        raise
    agg = result.aggregate
    if agg is None:
        view.close("interrupted")
    elif renderer is not None:
        renderer.finish(agg.finish_reason)
    doc = heavy_document(result, model_name)
    if fmt == "json":
        out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        out.flush()
    elif fmt == "jsonl":
        if agg is not None:
            emit({"type": "stats", **agg.stats.to_dict(), "batch_seconds": doc["batch_seconds"],
                  "batch_generation_tokens": doc["batch_generation_tokens"],
                  "batch_tps": doc["batch_tps"]})
        emit({"type": "done", "finish_reason": doc["finish_reason"]})
    elif not quiet:
        from .ui.term import wait_for_reader

        wait_for_reader(out)
        line = (f"[heavy: {n} trajectories, {doc['batch_generation_tokens']:,} tokens in "
                f"{result.batch_time:.1f} s ({doc['batch_tps']:.1f} tok/s together)")
        if agg is not None:
            st = agg.stats
            line += (f" | aggregate: {st.prompt_tokens} prompt tokens ({st.reused_tokens} "
                     f"reused), {st.generation_tokens} generated, {st.generation_tps:.1f} tok/s")
        sys.stderr.write(line + f" | {doc['finish_reason']}]\n")
    if result.interrupted:
        raise KeyboardInterrupt
