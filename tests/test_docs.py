"""The docs speak to users and show what the command really prints."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt.cli.commands import build_parser, main

REPO = Path(__file__).resolve().parent.parent
CLI_MD = REPO / "docs" / "cli.md"

# what a user cannot follow: the project's issue numbers, a design file they do not have (the
# repository's own is docs/design.md), and promises about when something will be measured
NOT_FOR_USERS = re.compile(
    r"\bissue\s*#?\d+|\bissue's\b|(?-i:\bDESIGN\.md)|next (GPU|device) (run|session|task)|in the next task|"
    r"(this|last|next) session",
    re.IGNORECASE,
)


def user_facing_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "src" / "asyncckpt").rglob("*.py"))
    files += sorted((REPO / "bench").glob("*.py")) + sorted((REPO / "bench").glob("*.sh"))
    return [f for f in files if f.exists()]


def test_docs_and_comments_name_no_issue_design_file_or_future_run():
    hits = []
    for path in user_facing_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if NOT_FOR_USERS.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert hits == []


def test_every_doc_page_named_exists():
    """A page the README, the docs or the code point to (``docs/format.md``) is in the repository."""
    missing = []
    for path in user_facing_files():
        text = path.read_text()
        named = set(re.findall(r"\bdocs/([\w-]+\.(?:md|png))", text))
        if path.parent.name == "docs":  # links between pages: [design.md](design.md)
            named |= set(re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]*)?\)", text))
        missing += [
            f"{path.relative_to(REPO)}: docs/{name}" for name in sorted(named) if not (REPO / "docs" / name).exists()
        ]
    assert missing == []


def documented_command_lines() -> list[list[str]]:
    lines = []
    for line in CLI_MD.read_text().splitlines():
        heading = re.fullmatch(r"## `asyncckpt (.+)`", line)
        prompt = re.fullmatch(r"\$ asyncckpt (.+)", line)
        if heading or prompt:
            lines.append(shlex.split((heading or prompt).group(1)))
    return lines


def test_every_command_line_in_cli_md_is_valid():
    lines = documented_command_lines()
    assert len(lines) >= 10
    parser = build_parser()
    for argv in lines:
        parser.parse_args(argv)  # a usage error raises SystemExit


def doc_block_after(heading: str) -> list[str]:
    text = CLI_MD.read_text()
    start = text.index(heading)
    block = text[start:].split("```\n", 2)[1]
    return block.splitlines()


@pytest.fixture
def clidemo(tmp_path) -> Path:
    """The root docs/cli.md describes: steps 100-500 of a 32-32-4 MLP, keep_last=3, step 100 tagged."""
    root = tmp_path / "clidemo"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": opt, "rng": asyncckpt.RNGState(), "step": 0}
    with asyncckpt.CheckpointManager(root, keep_last=3, policy=asyncckpt.EverySteps(100), workers=1) as mgr:
        for step in range(1, 501):
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            state["step"] = step
            handle = mgr.maybe_save(step, state, metrics={"loss": 0.5})
            if step == 100:
                handle.wait()
                mgr.tag(100, "first")
    return root


def test_cli_md_examples_match_the_real_output(clidemo, capsys):
    def run(*argv) -> list[str]:
        main([str(a) for a in argv])
        return capsys.readouterr().out.replace(str(clidemo), "/tmp/clidemo").splitlines()

    assert run("prune", clidemo, "--keep-last", "1", "--dry-run") == doc_block_after(
        "## `asyncckpt prune /tmp/clidemo --keep-last 1 --dry-run`"
    )
    assert run("prune", clidemo, "--after", "400", "--dry-run") == doc_block_after(
        "## `asyncckpt prune /tmp/clidemo --after 400 --dry-run`"
    )
    assert run("verify", clidemo) == doc_block_after("## `asyncckpt verify /tmp/clidemo`")
    ls = run("ls", clidemo)
    documented = doc_block_after("## `asyncckpt ls /tmp/clidemo`")
    assert ls[0] == documented[0]  # the header
    assert [row.split()[0] for row in ls] == [row.split()[0] for row in documented]  # the steps kept
    inspect = run("inspect", clidemo / "step-000000000500")
    documented = doc_block_after("## `asyncckpt inspect /tmp/clidemo/step-000000000500`")
    assert [line.split(":")[0] for line in inspect[7:]] == [line.split(":")[0] for line in documented[7:]]


# ---- docstrings of the public API ------------------------------------------------------------


# Documented together with the rework of their modules (the manager, loading, the save handle);
# a name leaves this set once its docstrings follow the style checked below.
def _public_api() -> list[tuple[str, object]]:
    from asyncckpt.policy import SavePolicy

    names = [(name, getattr(asyncckpt, name)) for name in asyncckpt.__all__]
    return [*names, ("SavePolicy", SavePolicy)]  # not exported, but users subclass it


def _raises_directly(fn) -> bool:
    """Whether the function's own body (not a nested function) raises an exception it names."""
    import ast
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return False
    tree = ast.parse(source).body[0]
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _function_problems(where: str, fn, *, method: bool) -> list[str]:
    import inspect

    doc = inspect.getdoc(fn) or ""
    if not doc:
        return [f"{where}: no docstring"]
    problems = []
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if not (method and p.name in ("self", "cls"))]
    if params and "Args:" not in doc:
        problems.append(f"{where}: no Args section")
    returns = signature.return_annotation
    if returns not in (None, "None", inspect.Signature.empty) and "Returns:" not in doc and "Yields:" not in doc:
        problems.append(f"{where}: no Returns section")
    if _raises_directly(fn) and "Raises:" not in doc:
        problems.append(f"{where}: raises, but has no Raises section")
    return problems


def _class_problems(name: str, cls: type) -> list[str]:
    import dataclasses
    import inspect

    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    if not doc:
        return [f"{name}: no docstring"]
    problems = []
    if dataclasses.is_dataclass(cls):
        if dataclasses.fields(cls) and "Attributes:" not in doc:
            problems.append(f"{name}: a dataclass without an Attributes section")
    elif "__init__" in vars(cls):
        init = vars(cls)["__init__"]
        has_params = len(inspect.signature(init).parameters) > 1
        if has_params and "Args:" not in doc and "Args:" not in (inspect.getdoc(init) or ""):
            problems.append(f"{name}: constructor arguments without an Args section")
        if _raises_directly(init) and "Raises:" not in doc and "Raises:" not in (inspect.getdoc(init) or ""):
            problems.append(f"{name}: the constructor raises, but there is no Raises section")
    for attr, value in vars(cls).items():
        if attr.startswith("_") and attr not in ("__await__",):
            continue
        if isinstance(value, property):
            if not (value.__doc__ or "").strip():
                problems.append(f"{name}.{attr}: no docstring")
            continue
        fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if callable(fn):
            problems += _function_problems(f"{name}.{attr}", fn, method=not isinstance(value, staticmethod))
    return problems


def test_public_api_docstrings_have_args_returns_raises_sections():
    """Google style: Args for parameters, Returns for a value, Raises where the body raises."""
    problems = []
    for name, obj in _public_api():
        if isinstance(obj, type):
            problems += _class_problems(name, obj)
        elif callable(obj):
            problems += _function_problems(name, obj, method=False)
    assert problems == []


def test_the_docstring_check_finds_what_it_looks_for():
    def undocumented(x: int) -> int:
        if x < 0:
            raise ValueError(x)
        return x

    def documented(x: int) -> int:
        """Echo.

        Args:
            x: a number.

        Returns:
            ``x``.

        Raises:
            ValueError: ``x`` is negative.
        """
        if x < 0:
            raise ValueError(x)
        return x

    assert _function_problems("f", undocumented, method=False) == ["f: no docstring"]
    undocumented.__doc__ = "Echo."
    assert len(_function_problems("f", undocumented, method=False)) == 3
    assert _function_problems("f", documented, method=False) == []
