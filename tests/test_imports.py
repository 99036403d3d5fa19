"""Imports follow use: ``zoo --help`` and ``zoo plan --help`` print without torch, Lightning or transformers,
and every command's parser still builds from its function's signature once its module is imported."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "transformers", "torchmetrics", "datasets", "safetensors", "wandb")


def loaded_after(argv: list[str]) -> tuple[str, list[str]]:
    """(stdout, the heavy modules imported) of ``zoo ARGV`` in a fresh interpreter."""
    code = ("import io, json, sys, contextlib\n"
            "from recipes.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            f"print(json.dumps([out.getvalue(), [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out, heavy = json.loads(done.stdout.splitlines()[-1])
    return out, heavy


@pytest.mark.parametrize("argv, needle", [(["--help"], "commands:"), (["plan", "--help"], "--recipe RECIPE")])
def test_help_imports_no_heavy_module(argv, needle):
    out, heavy = loaded_after(argv)
    assert needle in out
    assert heavy == []


def test_every_command_parser_builds():
    from recipes.command import COMMANDS, command_parser

    for name, command in COMMANDS.items():
        if command.target is None:
            continue
        parser = command_parser(name)
        options = {a.dest.split(".")[0] for a in parser._actions}
        parameters = set(inspect.signature(command.function()).parameters)
        assert parameters | {"config"} <= options, name
        assert ("data" in options) == (command.data is not None or "data" in parameters), name


def test_names_of_lazy_packages_resolve():
    import recipes
    import zoo
    import zoo.core

    for package in (zoo, zoo.core, recipes):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
    assert zoo.FisherSVD.__module__ == "zoo.fisher_svd"
    with pytest.raises(AttributeError):
        zoo.NoSuchTechnique  # noqa: B018 - the lookup is the test
