"""How much a saved KV cache saves when a long chat session is resumed (`kimi chat -c`).

Builds a conversation of about --tokens tokens, answers it once and saves the KV cache as the
chat does on exit; then times the next turn's first token in a fresh engine, cold (the whole
conversation is processed again) and resumed (the KV cache is loaded, only the new message is
processed). Greedy tokens must match.

    python scripts/bench_session_resume.py [--checkpoint DIR] [--preset small] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_cli.chat.reply import generate_reply  # noqa: E402
from kimi_cli.chat.template import render  # noqa: E402
from kimi_cli.engine import Engine, SamplingSettings  # noqa: E402
from kimi_cli.sessions import load_kv, model_fingerprint, save_kv  # noqa: E402

TOPICS = ["the weather in Beijing", "a Python function that parses JSON", "mixture-of-experts "
          "routing", "the history of Paris", "shell pipelines with grep and cat"]


def conversation(tokenizer, tokens: int) -> list[dict]:
    """User and assistant turns (canned text) until the prompt has about `tokens` tokens."""
    messages: list[dict] = []
    i = 0
    while True:
        topic = TOPICS[i % len(TOPICS)]
        messages.append({"role": "user", "content": f"Question {i}: tell me about {topic}."})
        messages.append({"role": "assistant", "content": (
            f"Answer {i}. Here is what I know about {topic}. " * 6).strip()})
        i += 1
        n = len(tokenizer.encode(render(messages, template=tokenizer.chat_template)))
        if n >= tokens:
            return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: a "
                    "synthetic one of --preset, written to a temporary directory)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from kimi_cli.loader import load

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            from kimi_cli.checkpoint.synthetic import write_checkpoint

            ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, seed=1)
        model, tok = load(ckpt)
        greedy = SamplingSettings(temperature=0.0, max_tokens=16)
        fp = model_fingerprint(model)

        messages = conversation(tok, args.tokens)
        first = Engine(model, tok)
        ids = tok.encode(render(messages[:-1], template=tok.chat_template))
        reply = generate_reply(first, tok, ids, greedy)  # the turn before the pause
        kv = Path(tmp) / "session.kv.safetensors"
        saved = save_kv(kv, first, fp)
        follow = [*messages[:-1], reply.message(),
                  {"role": "user", "content": "One more question: summarize it all."}]
        nxt = tok.encode(render(follow, template=tok.chat_template))

        cold, warm, loads = [], [], []
        for _ in range(args.repeats):
            engine = Engine(model, tok)
            t0 = time.perf_counter()
            c = generate_reply(engine, tok, nxt, greedy)
            cold.append(c.stats.ttft)
            engine = Engine(model, tok)
            t0 = time.perf_counter()
            info = load_kv(kv, engine, fp)
            w = generate_reply(engine, tok, nxt, greedy)
            loads.append(info.seconds)
            warm.append(time.perf_counter() - t0 - w.stats.generation_time)
            assert w.token_ids == c.token_ids, "resumed and cold runs must agree"

    med = statistics.median
    print(f"checkpoint: {ckpt if args.checkpoint else f'synthetic {args.preset} preset'}")
    print(f"next turn's prompt: {len(nxt):,} tokens; KV cache saved: {saved.tokens:,} tokens, "
          f"{saved.bytes / 1e6:.1f} MB (written in {saved.seconds:.3f} s)")
    print(f"cold   (process the whole conversation): first token after {med(cold):.3f} s "
          f"({c.stats.prefilled_tokens:,} tokens processed)")
    print(f"resume (load the KV cache, then the rest): first token after {med(warm):.3f} s "
          f"(load {med(loads):.3f} s, {w.stats.reused_tokens:,} tokens reused, "
          f"{w.stats.prefilled_tokens:,} processed)")
    print(f"saved: {med(cold) - med(warm):.3f} s per resume ({med(cold) / med(warm):.1f}x "
          f"faster to the first token); median of {args.repeats}")


if __name__ == "__main__":
    main()
