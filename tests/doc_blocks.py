"""Runs the code blocks of the README and docs/ pages, page by page, in one process; used by tests/test_docs.py.

`python doc_blocks.py PLAN.json RESULTS.json`. PLAN lists pages, each with the folder its blocks run in and
its blocks (already adapted by their `<!-- test: ... -->` lines); RESULTS gets, per page, one entry per block
run: its line, whether it worked and, if not, what went wrong. A page stops at its first failing block, since
the blocks after it may read what it writes.

A ```python block runs as a script (`__name__ == "__main__"`) in a fresh namespace. A ```bash block runs line
by line (a `\\` joins lines): a plain `retromae ...` line runs `retromae.cli.main` in this process, which is
what the `retromae` command runs, so that a page of commands costs one start-up; any other line runs in bash.
"""

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import traceback

from retromae.cli import main


SHELL_SYNTAX = set("|&;<>()$`*?")


def run_python(code: str, name: str) -> str | None:
    """Execute a Python block; the traceback (its lines named `name`) if it raised, else None."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        return traceback.format_exc()[-3000:]
    return None


def commands(code: str) -> list[str]:
    """The logical lines of a bash block: continuation lines joined, blank and comment lines left out."""
    joined = code.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_command(line: str, folder: str) -> str | None:
    """Run one line of a bash block; what went wrong if it failed, else None."""
    words = shlex.split(line, comments=True)
    if words[0] == "retromae" and not any(SHELL_SYNTAX & set(word) for word in words):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(words[1:])
            except SystemExit as exit:  # argparse's refusals
                code = exit.code
        return None if code == 0 else f"{line}\nexited {code}: {err.getvalue()[-3000:]}"
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=folder, capture_output=True, text=True)
    return None if result.returncode == 0 else f"{line}\nexited {result.returncode}: {result.stderr[-3000:]}"


def run_page(page: dict) -> list[dict]:
    """Run a page's blocks in order in its folder, up to the first that fails."""
    os.makedirs(page["folder"], exist_ok=True)
    os.chdir(page["folder"])
    results = []
    for block in page["blocks"]:
        name = f"{page['page']}:{block['line']}"
        if block["language"] == "python":
            error = run_python(block["code"], name)
        else:
            error = next(filter(None, (run_command(line, page["folder"]) for line in commands(block["code"]))), None)
        results.append({"line": block["line"], "error": error})
        if error:
            break
    return results


if __name__ == "__main__":
    plan = json.loads(open(sys.argv[1]).read())
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    results = {page["page"]: run_page(page) for page in plan["pages"]}
    open(sys.argv[2], "w").write(json.dumps(results))
