"""edit_file{path, old, new}: replace one exact, unique occurrence of `old` in a file with `new`.

Safety: the same as write_file (replaced, not written in place). Fails, changing nothing, if
`old` is absent or not unique.
"""

from __future__ import annotations

from ..safety import resolve
from .base import Tool, ToolContext, ToolError
from .read_file import read_text
from .write_file import diff, write


def _edited(args: dict, ctx: ToolContext) -> tuple[str, str]:
    path = resolve(ctx.workspace, args["path"], write=True)
    shown, old = args["path"], args["old"]
    text = read_text(path, shown)
    if not old:
        raise ToolError("old is empty: give the exact text to replace (use write_file to "
                        "create a file)")
    count = text.count(old)
    if count == 0:
        raise ToolError(f"old text not found in {shown}: read the file and copy the text "
                        "exactly, including whitespace and indentation")
    if count > 1:
        raise ToolError(f"old text occurs {count} times in {shown}: include more of the "
                        "surrounding lines so that it is unique")
    return text, text.replace(old, args["new"], 1)


def run(args: dict, ctx: ToolContext) -> str:
    before, after = _edited(args, ctx)
    note = write(resolve(ctx.workspace, args["path"], write=True), after, args["path"])
    removed = args["old"].count("\n") + 1
    added = args["new"].count("\n") + 1 if args["new"] else 0
    return f"edited {args['path']}: replaced {removed} line(s) with {added} line(s){note}"


def check(args: dict, ctx: ToolContext) -> None:
    resolve(ctx.workspace, args["path"], write=True)


def preview(args: dict, ctx: ToolContext) -> str:
    try:
        before, after = _edited(args, ctx)
    except ToolError as e:
        return f"(the edit will fail: {e})"
    return diff(args["path"], before, after)


TOOL = Tool(
    name="edit_file",
    description="Edit a text file in the workspace: replace the exact text `old` (which must "
                "occur exactly once; include enough context to make it unique) with `new`.",
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Path relative to the workspace."},
            "old": {"type": "string", "description": "Exact text to replace, once."},
            "new": {"type": "string", "description": "Replacement text."},
        },
        "required": ["path", "old", "new"],
    },
    kind="edit",
    run=run,
    check=check,
    preview=preview,
)
