"""Docs that cannot go stale: every ``python scripts/...`` command in the README and docs/ parses.

Each command is cut out of its Markdown (fenced blocks with their ``\\`` continuations, and inline
code), split as the shell would, and handed to that script's own ``main`` with ``parse_args``
intercepted: the script's real parser runs on the documented flags, and nothing after the parse
(no model, no file) does. A flag that does not exist, a value its parser refuses, or a command
naming a script that is not there fails here with the file and line. Quick tier: no model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:[\w./-]*/)?python3? (scripts/[\w-]+\.py)\b(.*)")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>&1"}
PLACEHOLDERS = {"N": "2", "I": "0"}
"""Stand-ins the docs use for the values of integer flags (multi-host: N processes, this is I)."""


def _logical_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, text, in a fenced block) with backslash continuations joined."""
    out, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if fenced:
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, pending + line, True))
            pending = ""
        else:
            out.append((number, line, False))
    return out


ASSIGNMENT = re.compile(r"^\s*([A-Z][A-Z0-9_]*)=(\"[^\"$]*\"|'[^'$]*')\s*(?:#.*)?$")
"""``NAME="flags"`` in a fenced block: a doc writes a flag set once and uses it as ``$NAME``."""


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Z][A-Z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) for every documented command."""
    found = []
    for doc in DOCS:
        variables: dict[str, str] = {}
        for number, line, fenced in _logical_lines(doc.read_text()):
            if fenced and (m := ASSIGNMENT.match(line)):
                variables[m.group(1)] = m.group(2)[1:-1]
                continue
            line = _expand(line, variables) if fenced else line
            pieces = [line] if fenced else re.findall(r"`([^`]*python3? scripts/[^`]*)`", line)
            for piece in pieces:
                for m in COMMAND.finditer(piece):
                    rest = m.group(2)
                    if piece[:m.start()].count('"') % 2:  # inside a quoted --command="..." argument
                        rest = rest.split('"', 1)[0]
                    if fenced and "#" in rest:  # a trailing shell comment
                        rest = re.split(r"\s#", rest, maxsplit=1)[0]
                    lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
                    lexer.whitespace_split = True
                    argv = []
                    for token in lexer:
                        if token in SHELL_OPERATORS:
                            break
                        argv.append(PLACEHOLDERS.get(token, token))
                    found.append((f"{doc.relative_to(REPO)}:{number}", m.group(1), argv))
    return found


class _Parsed(Exception):
    pass


def _parse_with_script(script: Path, argv: list[str], monkeypatch) -> tuple[int, str]:
    """Run ``script``'s ``main`` until its parser has parsed ``argv``; (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location(f"doc_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            module.main()
        except _Parsed:
            return 0, ""
        except SystemExit as exc:  # --help exits 0, a refused flag 2
            return int(exc.code or 0), err.getvalue()
    return -1, "main() returned without parsing its flags"


COMMANDS = documented_commands()


def test_the_docs_hold_commands() -> None:
    """The extraction finds the commands (a broken extractor must not pass by finding none)."""
    scripts = {script for _, script, _ in COMMANDS}
    assert len(COMMANDS) >= 15, COMMANDS
    assert {"scripts/tpu_dflash_build_teacher_cache.py", "scripts/tpu_dflash_train_with_easydel_trainer.py",
            "scripts/dflash_benchmark.py", "scripts/plan_tpu_run.py"} <= scripts, scripts


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w} {s}" for w, s, _ in COMMANDS])
def test_each_documented_command_parses(where: str, script: str, argv: list[str], monkeypatch) -> None:
    path = REPO / script
    assert path.is_file(), f"{where}: {script} does not exist"
    code, err = _parse_with_script(path, argv, monkeypatch)
    assert code == 0, f"{where}: {script} {shlex.join(argv)}\n{err.strip()}"


def test_a_wrong_flag_fails_the_check(monkeypatch) -> None:
    """The negative control: the same machinery refuses a flag that does not exist."""
    code, err = _parse_with_script(REPO / "scripts" / "dflash_verify.py", ["x", "--no-such-flag"], monkeypatch)
    assert code == 2 and "--no-such-flag" in err, err


PATH_MENTION = re.compile(r"(?<![\w/.:-])((?:dflash_gptoss|scripts|tests|modal|docs|artifacts)/[\w./-]*\w)(?![<{\w])")
"""A repository path (not part of a URL, not a pattern such as ``bench_<UTC>.json``)."""


def test_every_path_the_docs_name_exists() -> None:
    """A renamed module or a moved artifact leaves no dangling path in the README or docs/."""
    missing = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for path in PATH_MENTION.findall(line):
                if not (REPO / path).exists() and not list(REPO.glob(path + "*")):
                    missing.append(f"{doc.relative_to(REPO)}:{number}: {path}")
    assert not missing, "\n".join(missing)
