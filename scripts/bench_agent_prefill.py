"""Incremental prefill in agent runs: tokens prefilled per step against the tokens each step adds.

A 50-step agent run (49 tool steps, then an answer) on a synthetic checkpoint: the real network
runs every forward pass (prefill counts and times are real) while a wrapper forces the scripted
outputs' tokens through the logits. Re-processing the whole history each step would prefill
every step's whole prompt: that sum is exact, and its time is measured by prefilling a sample of
the steps' prompts from an empty cache (interpolated between them).

    python scripts/bench_agent_prefill.py [--preset tiny|small] [--steps 50] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

import kimi_cli
from kimi_cli.agent import events as ev
from kimi_cli.agent.approval import Mode, Policy
from kimi_cli.agent.loop import Agent, AgentConfig
from kimi_cli.agent.tools import ToolContext, select
from kimi_cli.checkpoint.synthetic import write_checkpoint
from kimi_cli.engine import Engine, SamplingSettings, Stats


class ForcedModel:
    """The real model, with each generation's logits forced to a scripted output's tokens."""

    def __init__(self, model, tokenizer, outputs: list[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.outputs = outputs
        self.layers = model.layers
        self.expert_cache = getattr(model, "expert_cache", None)
        self.calls = 0
        self._queue: list[int] = []
        self._prompt_tokens = 0

    def make_cache(self):
        return self.model.make_cache()

    def begin_generation(self, prompt_tokens: int | None = None) -> None:
        ids = self.tokenizer.encode(self.outputs[self.calls])
        if ids[-1] not in self.tokenizer.stop_ids:
            ids.append(self.tokenizer.im_end_id)
        self.calls += 1
        self._queue = ids
        self._prompt_tokens = prompt_tokens or 0

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        logits = self.model(ids, cache=cache)  # the real forward pass, real KV cache
        if cache and cache[0].offset < self._prompt_tokens:
            return logits  # an earlier prefill chunk: its logits are never sampled
        nxt = self._queue.pop(0) if self._queue else self.tokenizer.im_end_id
        B, _, V = logits.shape
        row = mx.zeros((V,), logits.dtype).at[nxt].add(1e4)
        return mx.concatenate([logits[:, :-1], mx.broadcast_to(row, (B, 1, V))], axis=1)


class RecordingEngine(Engine):
    """Keeps every step's prompt, so the whole-history cost can be measured afterwards."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.prompts: list[list[int]] = []

    def generate(self, prompt_ids, settings=None, stop_ids=None):
        self.prompts.append(list(prompt_ids))
        yield from super().generate(prompt_ids, settings, stop_ids)


def full_prefill_seconds(model, tokenizer, ids: list[int]) -> float:
    """Time to prefill `ids` from an empty cache: one step of a loop that keeps no KV cache."""
    engine = Engine(model, tokenizer)
    t0 = time.perf_counter()
    for _ in engine.prefill(ids, Stats()):
        pass
    return time.perf_counter() - t0


def whole_history_seconds(model, tokenizer, prompts: list[list[int]], samples: int) -> float:
    """Σ over steps of a full prefill, timed at `samples` evenly spaced steps and interpolated
    linearly in between (`samples` >= number of steps: every step is timed)."""
    n = len(prompts)
    picks = sorted({round(i * (n - 1) / max(1, samples - 1)) for i in range(min(samples, n))})
    timed = {k: full_prefill_seconds(model, tokenizer, prompts[k]) for k in picks}
    total = 0.0
    for a, b in zip(picks, picks[1:]):
        total += sum(timed[a] + (timed[b] - timed[a]) * (k - a) / (b - a) for k in range(a, b))
    return total + timed[picks[-1]]


def make_workspace(path: Path) -> None:
    path.mkdir(parents=True)
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(12))
        (path / f"mod{i}.py").write_text(f'"""Module {i}."""\n\n' + body)
    (path / "README.md").write_text("# Demo\n\nA project for the agent benchmark.\n")


def call(name: str, index: int, **args) -> str:
    return (f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>"
            f"{json.dumps(args)}<|tool_call_end|>")


def script(steps: int) -> list[str]:
    """`steps - 1` tool-calling steps cycling through the tools, then an answer."""
    outputs = []
    for i in range(steps - 1):
        m = i % 12
        kind = i % 6
        if kind == 0:
            c = call("read_file", i, path=f"mod{m}.py", start_line=1, end_line=14)
        elif kind == 1:
            c = call("grep", i, pattern=f"return x \\* {m % 10}", path=".")
        elif kind == 2:
            c = call("list_files", i, pattern=f"mod{m}*")
        elif kind == 3:
            c = call("edit_file", i, path=f"mod{m}.py", old=f"return x * 3 + {m}\n",
                     new=f"return x * 3 + {m}  # checked {i}\n")
        elif kind == 4:
            c = call("shell", i, command=f"wc -l mod{m}.py && head -3 mod{m}.py")
        else:
            c = call("write_file", i, path=f"notes/step{i}.md", content=f"Step {i}: ok.\n")
        reasoning = (f"Step {i + 1}. I checked module {m} so far; next I look at it with a "
                     f"different tool to make sure the change is consistent.")
        section = f"<|tool_calls_section_begin|>{c}<|tool_calls_section_end|><|im_end|>"
        if i % 10 == 9:
            # The model may open the call section inside its reasoning (no </think>): the history
            # then renders a </think> it did not generate, and the rest of that step is
            # prefilled again.
            outputs.append(f"<think>{reasoning}{section}")
        elif i % 10 == 4:
            outputs.append(f"<think>{reasoning}</think>Let me check that.{section}")
        else:
            outputs.append(f"<think>{reasoning}</think>{section}")
    outputs.append("<think>All modules checked.</think>Done: every module was checked.<|im_end|>")
    return outputs


def run_once(model, tokenizer, outputs: list[str], workspace: Path) -> dict:
    make_workspace(workspace)
    forced = ForcedModel(model, tokenizer, outputs)
    engine = RecordingEngine(forced, tokenizer)
    agent = Agent(engine, select(None), ToolContext(workspace.resolve()), Policy(Mode.yolo),
                  SamplingSettings(temperature=0.0, max_tokens=512), AgentConfig())
    steps = []
    t0 = time.perf_counter()
    done = None
    for e in agent.run("Check every module and note what you did."):
        if isinstance(e, ev.StepFinished):
            s = e.stats
            steps.append({"step": e.step, "prompt": s["prompt_tokens"],
                          "prefilled": s["prefilled_tokens"], "added": e.added_tokens,
                          "prompt_time": s["prompt_time"], "generated": s["generation_tokens"]})
            log(f"step {e.step}: prompt {s['prompt_tokens']}, prefilled {s['prefilled_tokens']}"
                f" (added {e.added_tokens}) in {s['prompt_time']:.2f} s")
        elif isinstance(e, ev.Done):
            done = e
    wall = time.perf_counter() - t0
    assert done.reason == "answer", done
    return {"totals": done.totals, "steps": steps, "wall_s": wall, "prompts": engine.prompts}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--checkpoint", type=Path, help="use this synthetic checkpoint instead")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=4,
                    help="steps whose whole-history prefill is timed (interpolated between; "
                         "the token count is exact: the sum of the prompt lengths); 0: none")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kimi-bench-agent-"))
    try:
        ckpt = args.checkpoint or write_checkpoint(tmp / "ckpt", args.preset, seed=0)
        model, tokenizer = kimi_cli.load(ckpt)
        outputs = script(args.steps)
        cached = run_once(model, tokenizer, outputs, tmp / "ws")
        log(f"timing whole-history prefills at {args.samples} of the steps ...")
        full_s = (whole_history_seconds(model, tokenizer, cached["prompts"], args.samples)
                  if args.samples else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    t = cached["totals"]
    report = {
        "checkpoint": str(args.checkpoint or f"synthetic {args.preset} preset"),
        "steps": t["steps"], "tool_calls": t["tool_calls"],
        "added_tokens": t["added_tokens"], "prefilled_tokens": t["prefilled_tokens"],
        "ratio": t["prefilled_tokens"] / t["added_tokens"],
        "final_prompt_tokens": cached["steps"][-1]["prompt"],
        "generated_tokens": t["generated_tokens"],
        "prefill_s": t["prompt_time"], "wall_s": cached["wall_s"],
        "full_history_tokens": t["prompt_tokens"],
        "full_history_ratio": t["prompt_tokens"] / t["added_tokens"],
    }
    assert t["prompt_tokens"] == sum(len(p) for p in cached["prompts"])
    if full_s is not None:
        report.update(full_history_prefill_s=full_s, timed_steps=min(args.samples, t["steps"]))
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['checkpoint']}: {report['steps']} steps, {report['tool_calls']} tool calls, "
          f"final prompt {report['final_prompt_tokens']} tokens, "
          f"{report['generated_tokens']} generated")
    print(f"{'':30}{'tokens prefilled':>18}{'x new tokens':>14}{'prefill s':>11}")
    print(f"{'new tokens (sum over steps)':30}{report['added_tokens']:>18}{1.0:>14.3f}")
    print(f"{'incremental (KV prefix kept)':30}{report['prefilled_tokens']:>18}"
          f"{report['ratio']:>14.3f}{report['prefill_s']:>11.2f}")
    full = f"{'whole history every step':30}{report['full_history_tokens']:>18}" \
           f"{report['full_history_ratio']:>14.3f}"
    if full_s is not None:
        full += f"{full_s:>11.2f}  (timed at {report['timed_steps']} steps, interpolated)"
    print(full)
    print(f"(the incremental run's wall time, decode included: {report['wall_s']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
