"""Every documented ``grpo-lab train`` and ``grpo-lab eval`` command composes.

The commands are those of the fenced shell blocks (bash, sh, shell, console) in README.md and
docs/, wherever they stand on a line (``python3 -m venv ... && grpo-lab train``), after any
``VAR=value`` prefix (``PYTHONPATH=. grpo-lab train``), with ``\\`` continuations joined. Each is
run through the real CLI with ``--cfg job`` appended: the CLI rewrites old option names, Hydra
composes the config tree with the overrides and prints it, and nothing is trained. A command
that needs a GPU, the hub or an extra composes all the same.

A ``-m`` sweep cannot be composed as such: Hydra refuses ``--cfg`` with ``--multirun``. Its
arguments go through the CLI's own step before Hydra (``sweep.prepare_argv``: plugins, GPU
workers, ``seeds=N``), then it is composed once per value: composition k takes the k-th value of
every swept key (cycling the shorter lists), so every value of every sweep is composed and a
sweep of 12 jobs takes 3 compositions, not 12.

A command that cannot compose here says so in its line's comment, ``# not composed: <why>``
(a path the reader fills in), after anything else the comment says. The test checks that each marked command still fails to compose,
so a marker cannot outlive its reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MARKER = "not composed:"
COMMANDS = ("train", "eval", "sft")  # sft composes the same config as train
_ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is, what follows ``grpo-lab``, and its marker's reason."""

    path: Path
    line: int  # 1-based, the line the command starts on
    argv: tuple[str, ...]  # ("train", "G=16", ...)
    not_composed: str | None = None  # the reason given by a "# not composed: ..." comment

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: grpo-lab {shlex.join(self.argv)}"


def _shell_lines(text: str):
    """(line number, logical line) of every fenced shell block, continuations joined."""
    language, pending, start = None, "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            language = (stripped[3:].strip().split() or [""])[0] if language is None else None
            continue
        if language not in SHELL_LANGUAGES:
            continue
        if language == "console":
            if not pending and not stripped.startswith("$ "):
                continue  # output, not a command
            stripped = stripped.removeprefix("$ ")
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""


def _split_comment(line: str) -> tuple[str, str | None]:
    """The line before its shell comment (a ``#`` that starts a word, outside quotes), and the
    comment's text."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i:].lstrip("#").strip()
    return line, None


def _commands_of_line(line: str) -> tuple[list[list[str]], str | None]:
    """The simple commands of one shell line, and the text of its trailing comment."""
    line, comment = _split_comment(line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in _OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return commands, comment


def documented_commands(path: Path) -> list[DocCommand]:
    """The ``grpo-lab train`` and ``grpo-lab eval`` commands of ``path``'s fenced shell blocks."""
    found = []
    for number, line in _shell_lines(path.read_text()):
        commands, comment = _commands_of_line(line)
        reason = None
        if comment and MARKER in comment:
            reason = comment.split(MARKER, 1)[1].strip() or "(no reason given)"
        for words in commands:
            while words and _ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]  # PYTHONPATH=. and the like: the environment, not the config
            if words[:1] == ["grpo-lab"] and words[1:2] and words[1] in COMMANDS:
                found.append(DocCommand(path, number, tuple(words[1:]), reason))
    return found


def documentation_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def compositions(argv: tuple[str, ...]) -> list[list[str]]:
    """The argument lists to compose with ``--cfg job``: the command itself, or for a ``-m``
    sweep one per value of its longest sweep (see the module docstring)."""
    command, args = argv[0], list(argv[1:])
    if not {"-m", "--multirun"} & set(args):
        return [[command, *args]]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from grpo_lab.sweep import prepare_argv

    args = [a for a in prepare_argv(args) if a not in ("-m", "--multirun")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:
        return [[command, *args]]  # composing it gives Hydra's own message
    choices = []
    for arg, override in zip(args, parsed):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([arg])
    n = max((len(c) for c in choices), default=1)
    return [[command, *(c[k % len(c)] for c in choices)] for k in range(n)]


def compose(args: list[str], cwd: Path) -> str | None:
    """Run ``grpo-lab <args> --cfg job``; None when it composes, else the CLI's message."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.cli", *args, "--cfg", "job"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0:
        return None
    lines = [
        line
        for line in (proc.stderr or proc.stdout).strip().splitlines()
        if "HYDRA_FULL_ERROR" not in line
    ]
    return "\n".join(lines).strip() or f"exit status {proc.returncode}"


def check_commands(commands: list[DocCommand], cwd: Path) -> list[str]:
    """One message per documented command that does not compose (or, marked, that does)."""
    jobs, failures = {}, []
    for command in commands:
        try:
            jobs[command] = compositions(command.argv)
        except SystemExit as err:  # a sweep argument the CLI refuses before Hydra
            if not command.not_composed:
                failures.append(f"{command}\n  {err}")
    unique = sorted({tuple(args) for args_list in jobs.values() for args in args_list})
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique, pool.map(lambda args: compose(list(args), cwd), unique)))
    for command, args_list in jobs.items():
        errors = [(args, results[tuple(args)]) for args in args_list if results[tuple(args)]]
        if command.not_composed:
            if not errors:
                failures.append(
                    f"{command}\n  is marked '# {MARKER} {command.not_composed}' but composes: "
                    "remove the marker"
                )
            continue
        for args, message in errors:
            shown = (
                "" if list(args) == list(command.argv) else f"\n  composed as: {shlex.join(args)}"
            )
            failures.append(f"{command}{shown}\n  " + message.replace("\n", "\n  "))
    return failures


# ----------------------------------------------------------------------------------- the docs


def test_every_documented_train_and_eval_command_composes(tmp_path):
    commands = [c for path in documentation_files() for c in documented_commands(path)]
    # a collector that finds nothing would pass: the README's tour and the manual hold dozens
    assert len(commands) >= 30, [str(c) for c in commands]
    assert any(c.path.name == "README.md" and c.argv[1:2] == ("-m",) for c in commands)
    marked = [c for c in commands if c.not_composed]
    assert len(marked) <= 5, "keep the list of commands that are not composed short: " + str(
        [str(c) for c in marked]
    )
    failures = check_commands(commands, tmp_path)
    assert not failures, "documented commands that do not compose:\n\n" + "\n\n".join(failures)


def test_the_getting_started_page_shows_the_readmes_two_commands():
    readme = (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "getting-started.md").read_text()
    for marker in ("<!-- train-command -->", "<!-- test-command -->"):
        block = readme.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
        assert f"```bash\n{block}```" in page, (marker, block)


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as GitHub and mkdocs' toc spell the plain ones."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_readmes_links_reach_the_manual():
    """The README is not part of the strict site build: its relative links are checked here."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 12, local
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README.md links {link}: no file {path}"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"README.md links {link}: no heading #{anchor}"


# ------------------------------------------------------------------------- the checker itself

PAGE = """\
# A page

```bash
grpo-lab train G=4 surrogate=cispo      # composes
grpo-lab train G=4 \\
  surogate=cispo                        # a misspelled key
```

Not a shell block, not checked: `grpo-lab train nonsense=1`.

```bash
PYTHONPATH=. grpo-lab train -m surrogate=ppo_clip,cipso seeds=2   # a misspelled sweep value
grpo-lab eval ckpt=<run>/last.ckpt      # not composed: the reader's run
grpo-lab eval ckpt=runs/a/last.ckpt     # not composed: a stale marker
```
"""


def test_a_misspelled_override_fails_naming_the_file_the_line_and_hydras_message(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    commands = documented_commands(page)
    assert [(c.line, c.argv[1], c.not_composed) for c in commands] == [
        (4, "G=4", None),
        (5, "G=4", None),
        (12, "-m", None),
        (13, "ckpt=<run>/last.ckpt", "the reader's run"),
        (14, "ckpt=runs/a/last.ckpt", "a stale marker"),
    ]
    failures = check_commands(commands, tmp_path)
    assert len(failures) == 3, failures
    key, value, stale = failures
    # the file and line, the command, and Hydra's own message
    assert key.startswith(f"{page}:5: grpo-lab train G=4 surogate=cispo\n")
    assert "Could not override 'surogate'" in key and "Key 'surogate' is not in struct" in key
    # a sweep: its second value is composed too (seeds=2 went through the CLI's prepare_argv)
    assert value.startswith(f"{page}:12: grpo-lab train -m surrogate=ppo_clip,cipso seeds=2\n")
    assert "composed as: train surrogate=cipso seed=1" in value
    assert "Could not find 'surrogate/cipso'" in value
    # a marker whose command composes is reported; one that does not compose is left alone
    assert stale.startswith(f"{page}:14: ") and "remove the marker" in stale


def test_a_misspelled_override_in_the_readme_fails_at_its_line(tmp_path):
    """The same with the README itself: one of its tour's overrides misspelled in a copy."""
    text = (ROOT / "README.md").read_text()
    original = "grpo-lab train G=16 beta=0.04 train.rollouts=300"
    assert text.count(original) == 1
    copy = tmp_path / "README.md"
    copy.write_text(text.replace(original, original.replace("rollouts", "rolouts")))
    line = text[: text.index(original)].count("\n") + 1
    commands = [c for c in documented_commands(copy) if line <= c.line <= line + 1]
    assert [c.line for c in commands] == [line, line + 1]  # the next one, a sweep, composes
    (failure,) = check_commands(commands, tmp_path)
    assert failure.startswith(f"{copy}:{line}: grpo-lab train G=16 beta=0.04 train.rolouts=300\n")
    assert "Key 'rolouts' is not in struct" in failure
