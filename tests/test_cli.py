"""Package-level behaviour: cheap import, a documented CLI, one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from seesay import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_import_is_cheap():
    code = (
        "import sys, seesay; heavy = [m for m in ('torch', 'titans_pytorch', 'wandb', 'pycocoevalcap', "
        "'matplotlib', 'jieba') if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import seesay pulled in: {out}"


def test_every_verb_is_registered():
    verbs = _subparsers(cli.build_parser())
    assert set(verbs) == set(cli.VERBS)


@pytest.mark.parametrize("verb", cli.VERBS)
def test_every_flag_is_documented(verb):
    sub = _subparsers(cli.build_parser())
    if verb not in sub:
        pytest.fail(f"verb {verb} has no command module")
    for action in sub[verb]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"seesay {verb}: {action.option_strings or action.dest} has no help"
    text = sub[verb].format_help()
    assert "default" in text


def test_help_runs_as_a_console_script():
    out = subprocess.run([sys.executable, "-m", "seesay", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in cli.VERBS:
        assert verb in out


def test_user_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.json"
    proc = subprocess.run(
        [sys.executable, "-m", "seesay", "prepare", "--format", "pairs", "--annotations", str(missing),
         "--images", str(tmp_path), "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert err_lines and str(missing.name) in err_lines[-1]
