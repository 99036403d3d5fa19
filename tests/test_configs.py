"""Every file under ``configs/`` parses with the command that reads it (configs/README.md's table says which):
a recipe with the parser of ``zoo fit`` (``ZooCLI``: class paths resolved, options checked against the
classes' signatures, nothing built), a command config with ``zoo COMMAND``'s parser. A renamed option or
technique breaks its shipped configs here, not in a user's first run."""
from __future__ import annotations

import importlib

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def readme_table() -> dict[str, str]:
    """configs/README.md's table: file (relative to configs/) -> the first ``zoo COMMAND`` that reads it."""
    rows = re.findall(r"^\| `([\w/.-]+\.yaml)` \| `zoo ([\w-]+)", (CONFIGS / "README.md").read_text(), re.M)
    return dict(rows)


def documented_runs(name: str) -> list[list[str]]:
    """The ``zoo ... --config configs/<name>`` lines of the file's own comments, as argument lists (a line's
    trailing ``# note`` dropped, ``\\`` continuations joined); ``[[--config FILE]]`` if it shows none."""
    comments = [line.lstrip("#").strip() for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#")]
    text = "\n".join(comments).replace("\\\n", " ")
    runs = [shlex.split(line, comments=True) for line in text.splitlines()
            if line.startswith("zoo ") and f"--config configs/{name}" in line]
    return runs or [["zoo", readme_table()[name], "--config", f"configs/{name}"]]


def shipped() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))


def test_the_readme_names_the_command_of_every_config():
    table = readme_table()
    assert sorted(table) == shipped()
    assert all(table[f] == "fit" for f in table if f.startswith("recipes/"))


@pytest.mark.parametrize("name", [f for f in shipped() if f.startswith("recipes/")])
def test_recipe_parses_with_the_fit_parser(name, monkeypatch):
    """``recipe_parser`` declares what ``zoo fit``'s parser does (trainer, model, data, the zoo's own options):
    class paths and options checked, nothing built."""
    from recipes.data.modules import check_data_options
    from recipes.recipe import recipe_parser

    monkeypatch.chdir(ROOT)  # the paths inside a config are relative to the repository root
    config = recipe_parser().parse_args(["--config", str(CONFIGS / name)])
    model, data = config["model"], config["data"]
    assert model["class_path"].startswith("zoo.") and model["init_args"]["teacher"]
    assert data["init_args"]["teacher"] == model["init_args"]["teacher"]  # the link of the zoo's arguments
    check_data_options(**data["init_args"])
    for callback in config["trainer"].get("callbacks") or []:  # light to build, and they check their options
        module, _, name = callback["class_path"].rpartition(".")
        getattr(importlib.import_module(module), name)(**dict(callback.get("init_args") or {}))


@pytest.mark.parametrize("name", [f for f in shipped() if f.startswith("commands/")])
def test_command_config_parses_with_its_command(name, monkeypatch):
    from recipes.command import COMMANDS, command_parser

    command = readme_table()[name]
    assert COMMANDS[command].target is not None, f"{name}: {command} is not a command with its own parser"
    monkeypatch.chdir(ROOT)  # the paths inside a config are relative to the repository root
    for run in documented_runs(name):
        assert run[:2] == ["zoo", command], run
        parsed = command_parser(command).parse_args(run[2:])
        assert [str(c) for c in parsed.config] == [f"configs/{name}"]
