"""The one error-message layer of the config models (config/messages.py): every pydantic error type the models
raise becomes one line, `<key>: <value> <problem>; allowed: ...`, read from pydantic's error fields and the field."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esq_lightning.config.commands import check_command_line, validate_options
from esq_lightning.config.messages import Choice, check, rule, validate
from esq_lightning.errors import ESQUserError


def _even(value: int) -> str | None:
    return None if value % 2 == 0 else "an even number"


class Quant(BaseModel):
    """A group model built as config/schema.py builds them (strict types, unknown keys refused)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    kind: Choice("bwn", "twn", None)  # type: ignore[valid-type]
    bits: int = Field(ge=1, le=8)
    ratio: float = Field(gt=0, lt=1, description="a fraction of the layer")
    flag: bool
    name: str
    weights: list[Annotated[float, Field(ge=0)]]
    stages: list[Choice("pretrain", "eval")] = Field(min_length=1)  # type: ignore[valid-type]
    width: Annotated[int, check(_even)]

    @model_validator(mode="after")
    def _bits_of_bwn(self) -> Quant:
        if self.kind == "bwn" and self.bits != 1:
            raise rule("bits", f"{self.bits} does not match {{key}}.kind=bwn; allowed: 1")
        return self


class Root(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    quant: Quant


GOOD: dict[str, Any] = {
    "kind": "twn",
    "bits": 2,
    "ratio": 0.5,
    "flag": True,
    "name": "x",
    "weights": [0.5, 1.0],
    "stages": ["eval"],
    "width": 4,
}
DROP = object()

# (change to a good quant node, pydantic's error type, the one line)
CASES = [
    (
        {"kind": "twm"},
        "literal_error",
        "quant.kind: 'twm' is not allowed; allowed: 'bwn', 'twn', null (did you mean 'twn'?)",
    ),
    ({"kind": True}, "literal_error", "quant.kind: true is not allowed; allowed: 'bwn', 'twn', null"),
    ({"bits": 0}, "greater_than_equal", "quant.bits: 0 is out of range; allowed: 1 <= bits <= 8"),
    ({"bits": 9}, "less_than_equal", "quant.bits: 9 is out of range; allowed: 1 <= bits <= 8"),
    ({"ratio": 0}, "greater_than", "quant.ratio: 0 is out of range; allowed: 0 < ratio < 1 (a fraction of the layer)"),
    ({"ratio": 1.0}, "less_than", "quant.ratio: 1.0 is out of range; allowed: 0 < ratio < 1 (a fraction of the layer)"),
    (
        {"ratio": float("nan")},
        "finite_number",
        "quant.ratio: nan is out of range; allowed: 0 < ratio < 1 (a fraction of the layer)",
    ),
    (
        {"weights": [0.5, -1.0]},
        "greater_than_equal",
        "quant.weights: [0.5, -1.0] (item -1.0) is out of range; allowed: 0 <= weights",
    ),
    ({"weights": [-1.0]}, "greater_than_equal", "quant.weights: [-1.0] is out of range; allowed: 0 <= weights"),
    ({"bits": 2.5}, "int_type", "quant.bits: 2.5 is not an integer; allowed: 1 <= bits <= 8"),
    ({"bits": "3"}, "int_type", "quant.bits: '3' is not an integer; allowed: 1 <= bits <= 8"),
    ({"flag": "yes"}, "bool_type", "quant.flag: 'yes' is not true or false; allowed: true or false"),
    ({"name": 3}, "string_type", "quant.name: 3 is not a string; allowed: a string"),
    ({"weights": ["a"]}, "float_type", "quant.weights: ['a'] is not a list of numbers; allowed: 0 <= weights"),
    ({"weights": 0.5}, "list_type", "quant.weights: 0.5 is not a list; allowed: a list"),
    ({"stages": []}, "too_short", "quant.stages: [] is too short; allowed: at least 1 item"),
    (
        {"stages": ["pretrain", "evl"]},
        "literal_error",
        "quant.stages: ['pretrain', 'evl'] (item 'evl') is not allowed; allowed: 'pretrain', 'eval' (did you mean 'eval'?)",
    ),
    ({"bits": DROP}, "missing", "quant.bits: missing; it must be set"),
    (
        {"bitz": 1},
        "extra_forbidden",
        "quant.bitz: unknown key (did you mean 'bits'?); allowed keys of quant: kind, bits, ratio, flag, name, weights, "
        "stages, width",
    ),
    ({"width": 3}, "esq_check", "quant.width: 3 is not allowed; allowed: an even number"),
    ({"kind": "bwn"}, "esq_rule", "quant.bits: 2 does not match quant.kind=bwn; allowed: 1"),
]


@pytest.mark.parametrize(("change", "kind", "message"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_pydantic_error_type_is_one_line(change: dict[str, Any], kind: str, message: str) -> None:
    node = {k: v for k, v in {**GOOD, **change}.items() if v is not DROP}
    with pytest.raises(ValidationError) as raw:
        Root.model_validate({"quant": node})
    assert raw.value.errors()[0]["type"] == kind  # the case exercises the error type it names
    with pytest.raises(ESQUserError) as err:
        validate(Root, {"quant": node})
    assert str(err.value) == message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"quant": 3}, "quant: 3 is not a mapping; allowed: a mapping of quant keys"),
        ({"quant": GOOD, "qaunt": 1}, "qaunt: unknown key (did you mean 'quant'?); allowed keys of the config: quant"),
    ],
)
def test_top_level_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ESQUserError) as err:
        validate(Root, data)
    assert str(err.value) == message


def test_a_missing_or_unresolvable_value_is_named_at_its_key() -> None:
    cfg = OmegaConf.create({"quant": {**GOOD, "bits": "???"}})
    with pytest.raises(ESQUserError) as err:
        validate(Root, cfg)
    assert str(err.value) == "quant.bits: ??? (no value given); set it, e.g. quant.bits=..."
    cfg = OmegaConf.create({"quant": {**GOOD, "bits": "${nowhere}"}})
    with pytest.raises(ESQUserError) as err:
        validate(Root, cfg)
    assert str(err.value).startswith("quant.bits: cannot resolve its value: ")


def test_the_validated_model_and_its_plain_data_come_back() -> None:
    model, data = validate(Root, OmegaConf.create({"quant": GOOD}))
    assert isinstance(model, Root) and model.quant.bits == 2 and data == {"quant": GOOD}


@pytest.mark.parametrize("command", ["esq-report", "esq-reproduce"])
def test_a_commands_unknown_key_reads_the_same_from_the_command_line_and_the_model(command: str) -> None:
    """One wording: check_command_line (before Hydra) and the option model (the Python API) agree."""
    with pytest.raises(ESQUserError) as line:
        check_command_line(command, ["quite=true" if command == "esq-report" else "scael=cifar"])
    values = {
        "esq-report": {
            "runs": ["x"],
            "out": None,
            "format": "md",
            "digits": 2,
            "quiet": False,
            "curve_x": "bits",
            "wandb": None,
            "wandb_mode": None,
            "quite": True,
        },
        "esq-reproduce": {
            "scale": "digits",
            "seeds": None,
            "n_jobs": None,
            "launcher": None,
            "runs_root": None,
            "datasets": None,
            "stages": ["eval"],
            "ablations": False,
            "blackbox": False,
            "threads": None,
            "dry_run": False,
            "train": [],
            "evaluate": [],
            "scael": "cifar",
        },
    }
    with pytest.raises(ESQUserError) as model:
        validate_options(command, values[command])
    assert str(line.value) == str(model.value)
    assert str(model.value).startswith(
        (
            "quite: unknown key (did you mean 'quiet'?); allowed keys of esq-report: ",
            "scael: unknown key (did you mean 'scale'?); allowed keys of esq-reproduce: ",
        )
    )
