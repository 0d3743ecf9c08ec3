"""nox sessions: tests, lint, docs, train, benchmark, bench. Each installs the CPU torch wheel first."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # the CPU build; a plain `torch` pulls the multi-GB CUDA build


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")  # pinned: format output changes between releases
    paths = ["src", "tests", "benchmarks", "docs/hooks.py", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The manual (docs/) and its API reference as a site in site/; a broken link, a missing
    anchor or an API reference to a moved object fails the strict build.

    mkdocstrings reads src/ without importing it, so only the `docs` extra's packages are
    installed: not grpo_lab's dependencies (torch, Lightning, MLflow, transformers)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the extra through pip, with the project
        session.install(TORCH)
        session.install("-e", ".[docs]")
    else:
        with open("pyproject.toml", "rb") as f:
            session.install(*tomllib.load(f)["project"]["optional-dependencies"]["docs"])
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python="3.11")
def train(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".")
    session.run("grpo-lab", "train", *session.posargs)


@nox.session(python="3.11")
def benchmark(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".")
    session.run("python", "benchmarks/learning.py", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Seconds per GRPO step against TRL and a plain loop: benchmarks/speed.py -> SPEED.md."""
    session.install(TORCH)
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/speed.py", *session.posargs)
