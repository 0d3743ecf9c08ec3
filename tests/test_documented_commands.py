"""Every documented ``grpo-lab train`` and ``grpo-lab eval`` command composes.

The commands are those of the fenced shell blocks (bash, sh, shell, console) in README.md and
docs/, wherever they stand on a line (``python3 -m venv ... && grpo-lab train``), after any
``VAR=value`` prefix (``PYTHONPATH=. grpo-lab train``) or wrapper (``srun grpo-lab train``), with
``\\`` continuations joined. A command in a block of another language, or one the collector
cannot read (inside ``$(...)``), fails ``test_no_documented_command_is_left_out``. Each is
run through the real CLI with ``--cfg job`` appended: the CLI rewrites old option names, Hydra
composes the config tree with the overrides and prints it, and nothing is trained. A command
that needs a GPU, the hub or an extra composes all the same.

A ``-m`` sweep cannot be composed as such: Hydra refuses ``--cfg`` with ``--multirun``. Its
arguments go through the CLI's own step before Hydra (``sweep.prepare_argv``: plugins, GPU
workers, ``seeds=N``), then it is composed once per value: composition k takes the k-th value of
every swept key (cycling the shorter lists), so every value of every sweep is composed and a
sweep of 12 jobs takes 3 compositions, not 12.

A composed config is then checked as the CLI checks it before any compute
(``config.validate``: types, ranges, options), so ``epsilon=2`` fails as a misspelled key does; a
``ckpt=`` or ``ckpt_path=`` file the command names is created, empty, in the folder it runs in.

A command that cannot compose here says so in its line's comment, ``# not composed: <why>``
(a placeholder the reader fills in, or bad input shown on purpose), after anything else the
comment says. The test checks that each marked command still fails, so a marker cannot outlive
its reason, and that with its placeholders filled in (``<date>`` -> ``x``, a ``...`` argument
left out) it composes, so the rest of its overrides is checked all the same.
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
COMPOSE_TIMEOUT_S = 120  # one composition takes about half a second
COMMANDS = ("train", "eval", "sft")  # sft composes the same config as train
_OPERATORS = {"&&", "||", ";", "|", "&"}
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")  # <date>, <run>: the reader's own value
_COMMAND_START = re.compile(
    r"^(?:\$ )?(?:[A-Za-z_][A-Za-z0-9_]*=\S* +)*grpo-lab +(?:train|eval|sft)\b"
)


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
            # after PYTHONPATH=. and the like (the environment, not the config) or a wrapper
            # (srun, nohup, timeout 60): the first grpo-lab, or python -m grpo_lab.cli
            for i, word in enumerate(words):
                if Path(word).name == "grpo-lab" and words[i + 1 : i + 2] in (
                    [c] for c in COMMANDS
                ):
                    found.append(DocCommand(path, number, tuple(words[i + 1 :]), reason))
                    break
                if words[i : i + 2] == ["-m", "grpo_lab.cli"] and words[i + 2 : i + 3] in (
                    [c] for c in COMMANDS
                ):
                    found.append(DocCommand(path, number, tuple(words[i + 2 :]), reason))
                    break
    return found


def left_out(path: Path) -> list[str]:
    """Lines of ``path``'s fenced blocks that hold a grpo-lab train/eval/sft command the collector
    does not read: a fence of another language (``text``, none), or a shell line where the command
    is not a simple command of its own (inside ``$(...)`` or quotes)."""
    collected = {c.line for c in documented_commands(path)}
    # a continuation's later lines belong to the command on its first line
    continued, previous = set(), ""
    language, missed = None, []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            language = (stripped[3:].strip().split() or [""])[0] if language is None else None
            previous = ""
            continue
        if language is None:
            continue
        if previous.endswith("\\"):
            continued.add(number)
        previous = stripped
        if number in collected or number in continued:
            continue
        shell = language in SHELL_LANGUAGES and (language != "console" or stripped[:2] == "$ ")
        code = _split_comment(stripped)[0] if shell else ""
        if _COMMAND_START.match(stripped) or re.search(r"\bgrpo-lab +(train|eval|sft)\b", code):
            missed.append(f"{path}:{number} (a ```{language} block): {stripped}")
    return missed


def documentation_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def filled_in(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` with its placeholders filled in: ``<date>`` -> ``x``, a ``...`` argument left out."""
    return tuple(_PLACEHOLDER.sub("x", arg) for arg in argv if arg != "...")


def compositions(argv: tuple[str, ...]) -> list[list[str]]:
    """The argument lists to compose with ``--cfg job``: the command itself, or for a ``-m``
    sweep one per value of its longest sweep (see the module docstring)."""
    command, args = argv[0], list(argv[1:])
    if not {"-m", "--multirun"} & set(args):
        return [[command, *args]]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from grpo_lab.sweep import prepare_argv

    # with --cfg, as the command is then run: a GPU sweep composes on a machine without GPUs
    prepared = prepare_argv([*args, "--cfg", "job"])
    at = prepared.index("--cfg")
    prepared = prepared[:at] + prepared[at + 2 :]
    args = [a for a in prepared if a not in ("-m", "--multirun")]
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
    """Run ``grpo-lab <args> --cfg job`` and validate what it prints; None when it composes and
    validates, else the CLI's (Hydra's) or the validation's message."""
    from omegaconf import OmegaConf

    from grpo_lab.config import ConfigError, validate

    for arg in args:  # validate() wants a checkpoint to exist; the command is only composed
        key, _, value = arg.partition("=")
        if key in ("ckpt", "ckpt_path") and value and not Path(value).is_absolute():
            (cwd / value).parent.mkdir(parents=True, exist_ok=True)
            (cwd / value).touch()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "grpo_lab.cli", *args, "--cfg", "job"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"grpo-lab {shlex.join(args)} --cfg job did not finish in {COMPOSE_TIMEOUT_S} s"
    if proc.returncode != 0:
        lines = [
            line
            for line in (proc.stderr or proc.stdout).strip().splitlines()
            if "HYDRA_FULL_ERROR" not in line
        ]
        return "\n".join(lines).strip() or f"exit status {proc.returncode}"
    cfg = OmegaConf.create(proc.stdout)
    for key in ("ckpt", "ckpt_path"):  # relative to the folder the command ran in
        value = cfg.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            cfg[key] = str(cwd / value)
    try:
        validate(cfg)
    except ConfigError as err:
        return str(err)
    return None


def check_commands(commands: list[DocCommand], cwd: Path) -> list[str]:
    """One message per documented command that does not compose (or, marked, that does; or,
    marked, that does not compose with its placeholders filled in)."""
    jobs, failures = {}, []  # (command, as written?) -> argument lists to compose
    for command in commands:
        variants = [(True, command.argv)]
        if command.not_composed and filled_in(command.argv) != command.argv:
            variants.append((False, filled_in(command.argv)))
        for as_written, argv in variants:
            try:
                jobs[command, as_written] = compositions(argv)
            except SystemExit as err:  # a sweep argument the CLI refuses before Hydra
                if not (command.not_composed and as_written):
                    failures.append(f"{command}\n  {err}")
    unique = sorted({tuple(args) for args_list in jobs.values() for args in args_list})
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique, pool.map(lambda args: compose(list(args), cwd), unique)))
    for (command, as_written), args_list in jobs.items():
        errors = {}  # message -> the first composition that gave it (a sweep's repeat once)
        for args in args_list:
            if results[tuple(args)]:
                errors.setdefault(results[tuple(args)], args)
        if command.not_composed and as_written:
            if not errors:
                failures.append(
                    f"{command}\n  is marked '# {MARKER} {command.not_composed}' but composes: "
                    "remove the marker"
                )
            continue
        for message, args in errors.items():
            if not as_written:
                shown = f"\n  with its placeholders filled in: {shlex.join(args)}"
            elif list(args) != list(command.argv):
                shown = f"\n  composed as: {shlex.join(args)}"
            else:
                shown = ""
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


def test_no_documented_command_is_left_out():
    missed = [line for path in documentation_files() for line in left_out(path)]
    assert not missed, (
        "grpo-lab commands the documented-command test would not compose: put each in a "
        "```bash block (```console with `$ `), as a command of its own:\n" + "\n".join(missed)
    )


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

```console
$ grpo-lab train epsilon=2
invalid config: ...
$ grpo-lab eval ckpt=<run>/last.ckpt eval.kk=8   # not composed: the reader's run
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
        (18, "epsilon=2", None),
        (20, "ckpt=<run>/last.ckpt", "the reader's run"),
    ]
    failures = check_commands(commands, tmp_path)
    by_line = {int(f.split(":", 2)[1]): f for f in failures}
    assert sorted(by_line) == [5, 12, 14, 18, 20], failures
    # the file and line, the command, and Hydra's own message
    key = by_line[5]
    assert key.startswith(f"{page}:5: grpo-lab train G=4 surogate=cispo\n")
    assert "Could not override 'surogate'" in key and "Key 'surogate' is not in struct" in key
    # a sweep: its second value is composed too (seeds=2 went through the CLI's prepare_argv)
    value = by_line[12]
    assert value.startswith(f"{page}:12: grpo-lab train -m surrogate=ppo_clip,cipso seeds=2\n")
    assert "composed as: train surrogate=cipso seed=1" in value
    assert "Could not find 'surrogate/cipso'" in value
    # a marker whose command composes is reported; one that does not compose is left alone
    assert "remove the marker" in by_line[14]
    assert 13 not in by_line
    # a value out of range: the CLI's own check before compute
    assert "epsilon=2 is invalid" in by_line[18]
    # a marked command's other overrides are composed with its placeholders filled in
    filled = by_line[20]
    assert "with its placeholders filled in: eval ckpt=x/last.ckpt eval.kk=8" in filled
    assert "Key 'kk' is not in struct" in filled


def test_a_command_the_collector_cannot_read_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```\n$ grpo-lab train G=1\n```\n"  # 2: no language
        "```text\ngrpo-lab eval ckpt=a.ckpt\n```\n"  # 5
        "```bash\nsrun -N1 grpo-lab train G=4 \\\n  epsilon=0.1\n"  # 8, 9: read (a wrapper)
        'echo "$(grpo-lab train --cfg job)"\n'  # 10: inside $(...)
        "PYTHONPATH=. python -m grpo_lab.cli eval eval.n=4\n```\n"  # 11: read
    )
    assert [(c.line, c.argv) for c in documented_commands(page)] == [
        (8, ("train", "G=4", "epsilon=0.1")),
        (11, ("eval", "eval.n=4")),
    ]
    assert [int(line.split(":", 2)[1].split()[0]) for line in left_out(page)] == [2, 5, 10]


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
