"""The options of esq-report and esq-reproduce (conf/report.yaml, conf/reproduce.yaml), checked by pydantic models.

The YAML files hold every option and its default; the models below hold none (every field is required), so a
default lives in one place. The models declare types, allowed values and the cross-key rules, and every failure
becomes one ESQUserError line naming the key and what is allowed, with "did you mean" for a misspelt key: the
error-message layer of every config model (config/messages.py) words it, as it does esq-train's.

The command lines go through Hydra (esq_lightning/cli/), which refuses a key that is not in the YAML before the
models see it; `check_command_line` gives that case the same one-line error and hint first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from esq_lightning.config.messages import Choice, rule, unknown_key, validate
from esq_lightning.errors import ESQUserError

# esq-reproduce: which datasets a scale covers, and the model of each (for finding checkpoints).
SCALES: dict[str, list[tuple[str, str]]] = {
    "digits": [("digits", "small_cnn")],
    "cifar": [("cifar10", "wrn28_10"), ("cifar100", "resnet152")],
}
Stage = Choice("pretrain", "quantize", "ablations", "eval", "report")
DEFAULT = "null: the scale's default"  # the note of a bounded option that may be null


def _as_list(value: Any) -> Any:
    """`key=a` and `key=[a,b]` both give a list (Hydra passes a scalar for the first)."""
    return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportOptions(_Options):
    """conf/report.yaml: the options of esq-report."""

    runs: list[str] = Field(min_length=1)
    out: str | None
    format: Choice("md", "latex", "both")
    digits: int = Field(ge=0, le=10)
    quiet: bool
    curve_x: Choice("bits", "bytes")
    wandb: str | None
    wandb_mode: Choice("online", "offline", "disabled", None)

    @field_validator("runs", mode="before")
    @classmethod
    def _one_folder_is_a_list(cls, value: Any) -> Any:
        return _as_list(value)


class ReproduceOptions(_Options):
    """conf/reproduce.yaml: the options of esq-reproduce (null: the scale's default, see the YAML)."""

    scale: Choice("digits", "cifar")
    seeds: Optional[list[int]] = Field(min_length=1)
    n_jobs: Optional[int] = Field(ge=1, description=DEFAULT)
    launcher: Choice("local", "slurm", "basic", None)
    runs_root: str | None
    datasets: Optional[list[str]] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)  # type: ignore[valid-type]
    ablations: bool
    blackbox: bool
    threads: Optional[int] = Field(ge=1, description=DEFAULT)
    dry_run: bool
    # Overrides passed to every esq-train / esq-eval call, e.g. train=[trainer.max_epochs=2]; `evaluate`, not
    # `eval`: that name is a config group of conf/ (Hydra would take eval=... as a choice of it).
    train: list[str]
    evaluate: list[str]

    @field_validator("seeds", "datasets", "stages", "train", "evaluate", mode="before")
    @classmethod
    def _one_value_is_a_list(cls, value: Any) -> Any:
        return _as_list(value)

    @model_validator(mode="after")
    def _datasets_of_the_scale(self) -> ReproduceOptions:
        known = [d for d, _ in SCALES[self.scale]]
        bad = [d for d in self.datasets or [] if d not in known]
        if bad:
            raise rule(
                "datasets", f"{', '.join(bad)} is not a dataset of scale={self.scale}; allowed: {', '.join(known)}"
            )
        return self


COMMANDS: dict[str, type[_Options]] = {"esq-report": ReportOptions, "esq-reproduce": ReproduceOptions}


def validate_options(command: str, values: Mapping[str, Any]) -> Any:
    """The options of `command` ("esq-report" / "esq-reproduce") as its model, or one ESQUserError line."""
    return validate(COMMANDS[command], dict(values), root=command)[0]


# ------------------------------------------------------------------------------------------------ command lines

# Hydra's own flags; those in TAKES_VALUE read the next word.
HYDRA_FLAGS = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-c",
    "--cfg",
    "-p",
    "--package",
    "--resolve",
    "-i",
    "--info",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
    "-sc",
    "--shell-completion",
    "-r",
    "--run",
}
TAKES_VALUE = {
    "-c",
    "--cfg",
    "-p",
    "--package",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
    "-sc",
    "--shell-completion",
}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_OVERRIDE_KEY = re.compile(r"^(\+{0,2}[\w@/.\-]+=|~[\w@/.\-]+(=|$))")


def check_command_line(command: str, argv: Sequence[str]) -> None:
    """One ESQUserError line for what Hydra would refuse with a long message: an unknown key (with a hint),
    a word that is no key=value (the old positional and --flag forms), or -m (a report or pipeline runs once)."""
    fields = list(COMMANDS[command].model_fields)
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            raise ESQUserError(f"{arg}: {command} runs once (no multirun); give its options as key=value")
        if arg.startswith("-"):
            flag = arg.split("=", 1)[0]
            if flag in HYDRA_FLAGS:
                skip = "=" not in arg and (
                    flag in TAKES_VALUE
                    or (flag in ("-i", "--info") and i + 1 < len(argv) and argv[i + 1] in INFO_VALUES)
                )
                continue
            key = arg.lstrip("-").split("=", 1)[0].replace("-", "_")
            model = COMMANDS[command]
            hint = (
                f"{key}=true"
                if key in fields and model.model_fields[key].annotation in (bool, "bool")
                else f"{key}=..."
                if key in fields
                else f"key=value ({', '.join(fields)})"
            )
            raise ESQUserError(f"{arg}: {command} takes options as key=value, e.g. {hint}; see {command} --help")
        key, sep, _ = arg.partition("=")
        if not sep and not key.startswith("~"):
            example = f"runs={arg}" if command == "esq-report" else f"key=value ({', '.join(fields)})"
            raise ESQUserError(f"{arg}: give options as key=value, e.g. {example}; see {command} --help")
        name = key.lstrip("+~")
        if name.split(".")[0].split("/")[0] == "hydra":
            continue
        if name not in fields:
            raise ESQUserError(unknown_key("", name, fields, root=command))
        value = arg.partition("=")[2]
        if len(_top_level_split(value)) > 1:
            raise ESQUserError(
                f"{arg}: {command} runs once (a comma would make a sweep); give a list as {name}=[{value}]"
            )


def quote_pass_through(argv: Sequence[str], keys: Sequence[str]) -> list[str]:
    """`train=[trainer.max_epochs=2,quant=bwn,twn]` as Hydra can parse it: each override a quoted string.

    Hydra's grammar refuses `=` in an unquoted value, so the overrides that esq-reproduce passes on to esq-train /
    esq-eval are quoted here. A top-level comma starts a new override only where a `key=` follows, so a sweep
    value (`quant=bwn,twn`) stays one override; brackets (`eval.attacks=[fgsm,pgd20]`) and quoted items are kept.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in keys and value.startswith("[") and value.endswith("]"):
            items = split_overrides(value[1:-1])
            arg = f"{key}=[" + ",".join(_hydra_quote(item) for item in items) + "]"
        out.append(arg)
    return out


def split_overrides(text: str) -> list[str]:
    """The overrides of a pass-through list's inside: `a=1,b=x,y` -> ['a=1', 'b=x,y']."""
    parts: list[str] = []
    for piece in _top_level_split(text):
        stripped = piece.strip()
        if not stripped:
            continue
        if parts and not _is_quoted(stripped) and not _OVERRIDE_KEY.match(stripped):
            parts[-1] += "," + stripped  # a further value of a sweep: quant=bwn,twn
        else:
            parts.append(stripped)
    return parts


def _top_level_split(text: str) -> list[str]:
    """text split at the commas outside brackets and quotes."""
    depth, quote, start = 0, "", 0
    pieces: list[str] = []
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""


def _hydra_quote(item: str) -> str:
    if _is_quoted(item):
        return item
    if "'" not in item:
        return f"'{item}'"
    if '"' not in item:
        return f'"{item}"'
    return "'" + item.replace("'", "\\'") + "'"


def hydra_value(text: str) -> str:
    """A path or word as a Hydra override value: as it is when Hydra's grammar takes it unquoted, else quoted."""
    return text if re.fullmatch(r"[\w./\-:@~+]+", text) else _hydra_quote(text)
