"""Run the ``zoo`` command in-process for tests."""
from __future__ import annotations

from recipes.cli import main


def zoo_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``zoo ARGS``."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
