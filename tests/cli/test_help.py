"""Every option of every subcommand says what it does and its default in ``--help`` (no "gamma  gamma")."""

from __future__ import annotations

import argparse

import pytest

from cbam.cli import COMMANDS, build_parser, main

DEFAULT_WORDS = ("default", "%(default)s", "(on)", "(off)", "required")


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def test_every_command_has_a_parser():
    assert set(subcommand_parsers()) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_says_what_it_does_and_its_default(command):
    parser = subcommand_parsers()[command]
    actions = documented_actions(parser)
    assert actions
    for action in actions:
        label = f"cbam {command} {'/'.join(action.option_strings) or action.dest}"
        text = (action.help or "").strip()
        assert text, f"{label}: no help"
        what = text.split("(default")[0].strip(" .;,").lower()
        names = {action.dest.replace("_", " "), action.dest.replace("_", "-")}
        names |= {opt.lstrip("-").replace("-", " ") for opt in action.option_strings}
        assert what and what not in names, f"{label}: help only repeats the name ({text!r})"
        assert len(what.split()) >= 2, f"{label}: help too short to say what it does ({text!r})"
        assert any(word in text for word in DEFAULT_WORDS), f"{label}: help does not give the default ({text!r})"
    parser.format_help()  # every %(default)s expands


def test_train_help_lists_the_fusion_flags(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--fuse, --no-fuse", "--memory-efficient, --no-memory-efficient", "--reduction", "--gamma"):
        assert flag in out, flag


def test_units_are_named_where_an_option_has_one():
    parsers = subcommand_parsers()
    helps = {(c, o): a.help for c, p in parsers.items() for a in documented_actions(p) for o in a.option_strings}
    assert "pixels" in helps[("train", "--image-size")] and "pixels" in helps[("profile", "--input-size")]
    assert "epochs" in helps[("train", "--step-size")] and "seconds" in helps[("bench", "--min-seconds")]
    assert "images" in helps[("train", "--batch-size")] and "steps" in helps[("train", "--save-every-steps")]
