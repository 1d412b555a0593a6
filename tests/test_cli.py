"""The command line: every --help answers, nested index actions, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import main

COMMANDS = [
    [],
    ["weights"],
    ["embed"],
    ["train"],
    ["index"],
    ["index", "build"],
    ["index", "add"],
    ["index", "remove"],
    ["index-add"],
    ["index-remove"],
    ["evaluate"],
    ["evaluate-ensemble"],
    ["serve"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "imgsim")
def test_every_help_works(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: imgsim" in capsys.readouterr().out


def test_index_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["index", "--model", "m", "--data", "d", "--out", "o"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "build" in err and "add" in err and "remove" in err


def test_shared_options_are_declared_once_and_reused(capsys: pytest.CaptureFixture[str]) -> None:
    """--data, --val-fraction, --seed and --max-per-class mean the same in every stage that takes them."""
    helps = {}
    for command in (["embed"], ["train"], ["index", "build"], ["evaluate"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        helps[" ".join(command)] = capsys.readouterr().out
    for text in helps.values():
        assert "--val-fraction VAL_FRACTION" in text and "--max-per-class MAX_PER_CLASS" in text


def test_a_missing_dataset_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["embed", "--backbone", "vgg16", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("imgsim embed: error: dataset not found")
