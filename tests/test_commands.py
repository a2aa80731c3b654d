"""The options of esq-report and esq-reproduce: one place per default (the YAML), checked by config/commands.py."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from esq_lightning.config.commands import (
    COMMANDS,
    check_command_line,
    hydra_value,
    quote_pass_through,
    split_overrides,
    validate_options,
)
from esq_lightning.errors import ESQUserError

CONFIGS = {"esq-report": "report", "esq-reproduce": "reproduce"}


def composed(command: str, *overrides: str) -> dict:
    with initialize_config_module("esq_lightning.conf", version_base="1.3"):
        cfg = compose(CONFIGS[command], overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@pytest.mark.parametrize("command", list(CONFIGS))
def test_the_yaml_holds_every_option_and_the_model_none_of_the_defaults(command: str) -> None:
    model = COMMANDS[command]
    values = composed(command, *(["runs=x"] if command == "esq-report" else []))
    assert list(values) == list(model.model_fields)  # the same keys, in the same order
    assert all(field.is_required() for field in model.model_fields.values())  # no second copy of a default
    validate_options(command, values)  # the defaults pass their own checks


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("trainer.max_epochs=2", ["trainer.max_epochs=2"]),
        ("trainer.max_epochs=2,quant=bwn,twn", ["trainer.max_epochs=2", "quant=bwn,twn"]),
        ("eval.attacks=[fgsm,pgd20],+x.y=1,~z", ["eval.attacks=[fgsm,pgd20]", "+x.y=1", "~z"]),
        ("'a=1,b',hydra/launcher=slurm", ["'a=1,b'", "hydra/launcher=slurm"]),
        ("", []),
    ],
)
def test_pass_through_items_split_where_an_override_starts(text: str, items: list[str]) -> None:
    assert split_overrides(text) == items


def test_pass_through_lists_are_quoted_for_hydra_and_parse_back_as_written() -> None:
    argv = quote_pass_through(
        [
            "train=[trainer.max_epochs=2,quant=bwn,twn,eval.attacks=[fgsm]]",
            "scale=digits",
            "evaluate=[eval.n_samples=32]",
            "runs_root=x",
        ],
        ["train", "evaluate"],
    )
    assert argv[1] == "scale=digits" and argv[3] == "runs_root=x"
    values = composed("esq-reproduce", *argv)
    assert values["train"] == ["trainer.max_epochs=2", "quant=bwn,twn", "eval.attacks=[fgsm]"]
    assert values["evaluate"] == ["eval.n_samples=32"]


def test_paths_are_quoted_only_when_hydra_needs_it() -> None:
    assert hydra_value("outputs/reproduce-digits") == "outputs/reproduce-digits"
    assert hydra_value("my runs,2") == "'my runs,2'"
    assert composed("esq-report", f"runs={hydra_value('my runs,2')}")["runs"] == "my runs,2"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["runz=x"],
            "runz: unknown key (did you mean 'runs'?); allowed keys of esq-report: runs, out, format, digits, "
            "quiet, curve_x, wandb, wandb_mode",
        ),
        (["runs=a,b"], "runs=a,b: esq-report runs once (a comma would make a sweep); give a list as runs=[a,b]"),
        (["--out", "x"], "--out: esq-report takes options as key=value, e.g. out=...; see esq-report --help"),
        (["--multirun"], "--multirun: esq-report runs once"),
    ],
)
def test_command_line_mistakes_are_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ESQUserError) as err:
        check_command_line("esq-report", argv)
    assert str(err.value).startswith(message)


def test_hydra_flags_and_hydra_keys_pass() -> None:
    check_command_line("esq-report", ["--cfg", "job", "runs=[a,b]", "hydra.run.dir=.", "-i", "config", "--help"])
    check_command_line("esq-reproduce", ["scale=cifar", "train=[a=1,b=2]", "~seeds", "+threads=2"])
