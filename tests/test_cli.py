"""`vpo` dispatcher: every command imports, and exceptions become exit codes in one place."""
from __future__ import annotations

import importlib

import pytest

from vpo_ray import cli


def test_every_command_module_imports_and_registers():
    """A command whose module does not import fails here (no "not in this build" path)."""
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == set(cli.COMMANDS)
    for name, sub in subs.items():
        assert callable(sub.get_default("_run")), name


@pytest.mark.parametrize("module, name, code, prefix", cli.ERROR_EXITS, ids=[e[1] for e in cli.ERROR_EXITS])
def test_each_mapped_error_exits_with_its_code_and_one_message(module, name, code, prefix, monkeypatch, capsys):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, Exception), f"{module}.{name} is not an exception class"

    def fail(args):
        raise cls("the thing at fault\n  second line")

    monkeypatch.setattr(importlib.import_module("vpo_ray.models.cli"), "run", fail)
    assert cli.main(["models", "list"]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"vpo models: {prefix}the thing at fault") and "Traceback" not in err
    if code == 2:  # a user error is one line
        assert err.count("\n") == 1


def test_data_error_is_reported_as_training_data_not_config():
    from vpo_ray.config_loader import ConfigError
    from vpo_ray.train.data import DataError

    assert issubclass(DataError, ConfigError)
    assert cli.exit_code_for(DataError("x")) == (2, "bad training data: ")
    assert cli.exit_code_for(ConfigError("x")) == (2, "config error: ")


def test_other_exceptions_keep_their_traceback(monkeypatch):
    def fail(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(importlib.import_module("vpo_ray.models.cli"), "run", fail)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cli.main(["models", "list"])
