"""The command line's shape: one module per verb, every verb's ``--help``, ``--quiet`` where it matters."""

from __future__ import annotations

import argparse
import pkgutil
import subprocess
import sys

import pytest

import sparsediff.commands as commands
from sparsediff import cli
from sparsediff.commands import VERBS, build_parser, main
from sparsediff.commands.common import call, emit, floats, ints, names

# The verbs that report progress (train, sample, evaluate, ...): each takes --quiet.
PROGRESS_VERBS = (
    "train",
    "train-autoencoder",
    "sample",
    "evaluate",
    "demo",
    "finetune",
    "sweep",
    "train-features",
)
VERB_NAMES = [verb.NAME for verb in VERBS]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_registry_has_one_module_per_verb():
    modules = {m.name for m in pkgutil.iter_modules(commands.__path__)} - {"common"}
    assert sorted(verb.__name__.rpartition(".")[2] for verb in VERBS) == sorted(modules)
    assert len(set(VERB_NAMES)) == len(VERB_NAMES)
    for verb in VERBS:
        assert verb.NAME.replace("-", "_") == verb.__name__.rpartition(".")[2]
        assert isinstance(verb.HELP, str) and verb.HELP
        assert callable(verb.add_arguments) and callable(verb.run)
    assert list(_subparsers(build_parser())) == VERB_NAMES


def test_the_old_entry_points_are_the_same_command_line():
    assert cli.main is main and cli.build_parser is build_parser


@pytest.mark.parametrize("verb", VERB_NAMES)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert f"usage: sparsediff {verb}" in capsys.readouterr().out


@pytest.mark.parametrize("verb", PROGRESS_VERBS)
def test_verbs_that_report_progress_take_quiet(verb):
    option_strings = {s for a in _subparsers(build_parser())[verb]._actions for s in a.option_strings}
    assert "--quiet" in option_strings


def test_python_dash_m_runs_the_same_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "sparsediff", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(verb in out for verb in VERB_NAMES)


def test_an_unknown_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-verb"])
    assert e.value.code == 2
    assert "invalid choice: 'no-such-verb'" in capsys.readouterr().err


def test_comma_separated_option_types():
    assert floats("0.25, 0.5,") == [0.25, 0.5]
    assert ints("0,1,2") == [0, 1, 2]
    assert names(" dense , rigl ") == ["dense", "rigl"]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated whole numbers, got '0,x'"):
        ints("0,x")


def test_call_passes_the_options_named_like_parameters():
    def lib(run_dir, num=1, use_ema=True, quiet=False):
        return run_dir, num, use_ema, quiet

    args = argparse.Namespace(run_dir="r", num=3, use_ema=False, json=True, command="x", verb=None)
    assert call(lib, args) == ("r", 3, False, False)
    assert call(lib, args, num=5, quiet=True) == ("r", 5, False, True)


def test_emit_prints_json_or_the_line(capsys):
    emit(argparse.Namespace(json=True), {"a": 1}, "line")
    assert capsys.readouterr().out == '{\n  "a": 1\n}\n'
    emit(argparse.Namespace(json=False), {"a": 1}, "line")
    assert capsys.readouterr().out == "line\n"
    emit(argparse.Namespace(), {"a": 1}, None)
    assert capsys.readouterr().out == ""


def test_demo_engine_runs_through_the_command_line(capsys):
    assert main(["demo", "--engine", "--steps", "40", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
