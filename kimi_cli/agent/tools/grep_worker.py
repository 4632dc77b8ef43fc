"""The killable half of grep: runs as `python -I -S grep_worker.py`, reads a job (pattern, files)
as JSON on stdin and prints one JSON line per match, so a backtracking pattern can be stopped.
"""

import json
import os
import re
import stat
import sys


def main() -> None:
    job = json.load(sys.stdin)
    regex = re.compile(job["pattern"])
    out = sys.stdout
    for path, rel in job["files"]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > job["max_file"]:
                continue
            data = f.read()
        if b"\0" in data[:8192]:
            continue
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if regex.search(line):
                out.write(json.dumps([rel, n, line[:job["max_line"] + 1]]) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
