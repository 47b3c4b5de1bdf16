"""Runs `retromae` command lines one after another in this process and records what each did.

Used by tests/test_bad_input.py as a subprocess, so that the hostile inputs meet the commands as a user's shell
would run them, at the cost of one start-up: `python cli_cases.py CASES.json RESULTS.json`, where CASES maps a
name to `{"argv": [...], "env": {...}}` and RESULTS gets `{"code": exit code, "err": standard error}` per name.
"""

import contextlib
import io
import json
import os
import sys

from retromae.cli import main


def run(argv: list[str], env: dict[str, str]) -> dict:
    saved = dict(os.environ)
    os.environ.update(env)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit:  # argparse's refusals
                code = exit.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"code": code, "err": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    results = {name: run(case["argv"], case.get("env", {})) for name, case in cases.items()}
    open(sys.argv[2], "w").write(json.dumps(results))
