"""Config validation: bad configs fail at composition with one line naming the key, through the real esq-train."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from esq_lightning.commands.checks import validate_config
from esq_lightning.config import schema
from esq_lightning.errors import ESQUserError
from tests.hydra_utils import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# (overrides, text the one-line message must contain: the key, and where useful the bad value)
CLI_CASES: list[tuple[list[str], list[str]]] = [
    (["+quant.bitz=1"], ["quant.bitz", "unknown key", "bits"]),
    (["+method.lambda=1"], ["method.lambda", "unknown key"]),
    (["quant=bwn", "quant.bits=3"], ["quant.bits", "3", "bwn=1"]),
    (["quant.variant=papr"], ["quant.variant", "'papr'", "paper"]),
    (["quant.f=cubic"], ["quant.f", "'cubic'", "linear"]),
    (["callbacks.quant_ratio.start=0"], ["callbacks.quant_ratio.start", "0 < start <= 1"]),
    (["callbacks.quant_ratio.step=0"], ["callbacks.quant_ratio.step", "0 < step"]),
    (["callbacks.quant_ratio.every_n_epochs=0"], ["callbacks.quant_ratio.every_n_epochs", "1 <= every_n_epochs"]),
    (["callbacks.pgd.eps=1.5"], ["callbacks.pgd.eps", "1.5", "[0, 1]"]),
    (["callbacks.pgd.steps=-1"], ["callbacks.pgd.steps", "-1"]),
    (["eval.eps=-0.1"], ["eval.eps", "-0.1"]),
    (["pairing.lambdas=[-1]"], ["pairing.lambdas", "-1", "0 <= lambdas"]),
    (["pairing.lambdas=[1,1]"], ["pairing.lambdas", "one lambda per layer"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs", "1 <= max_epochs"]),
    (["trainer.max_epochs=ten"], ["trainer.max_epochs", "'ten'", "integer"]),
    (["method.name=madry"], ["method.name", "'madry'", "adversarial"]),
    (["+logger.csvv.save_dir=x"], ["logger.csvv", "csv"]),
    (["experiment=typo"], ["trainer.max_epoch", "unknown key", "max_epochs"]),  # a typo inside a custom yaml
    (["+data.attack.epss=0.1"], ["data.attack.epss", "unknown key", "eps"]),
    (["optimizer.lr=-0.1"], ["optimizer.lr", "-0.1", "0 < lr"]),
    # Phase 2 (imports torch, still before any data is read)
    (["eval.attacks=[fgsm,pgd21]"], ["eval.attacks[1]", "'pgd21'", "pgd20"]),
    (
        ["pairing.layers=[logits,nope]", "pairing.lambdas=[1,1]", "pairing.distance=relative_l2"],
        ["pairing.layers", "'nope'", "block1"],
    ),
    (
        ["pairing.layers=[block3,logits]", "pairing.lambdas=[1,1]"],
        ["pairing.distance", "kl", "logits only", "relative_l2"],
    ),
    (
        ["data=cifar10", "model=resnet20", "data.data_dir=no_such_dir"],
        ["data.data_dir", "no_such_dir", "download=true"],
    ),
    (["ckpt_path=last"], ["ckpt_path=last", "hydra.run.dir"]),
]


def _run_cli(args: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "esq_lightning.cli.train", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stderr


# Calls esq-train's main (Hydra's argument parsing and error reporting, our one-line wrapper) once per
# case inside one process: a process per case would spend most of its time importing.
DRIVER = """
import contextlib, io, json, sys, traceback
from hydra.core.global_hydra import GlobalHydra
from esq_lightning.cli.train import main
out = []
for args in json.loads(sys.argv[1]):
    GlobalHydra.instance().clear()
    sys.argv = ["esq-train", *args]
    err = io.StringIO()
    rc = 0
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = -1
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def _run_in_one_process(cases: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _problem(overrides: list[str], needles: list[str], rc: int, err: str, run_dir: Path) -> str | None:
    lines = [line for line in err.splitlines() if line.strip()]
    if rc != 2 or "Traceback" in err or len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{overrides}: rc={rc}, stderr={err[-600:]!r}"
    if not all(n in lines[0] for n in needles):
        return f"{overrides}: {lines[0]!r} lacks one of {needles}"
    if (run_dir / "checkpoints").exists() or (run_dir / "csv").exists():
        return f"{overrides}: failed only after training started"
    return None


def test_bad_configs_fail_through_esq_train_in_one_line(tmp_path: Path) -> None:
    extra = tmp_path / "extra_conf"
    (extra / "experiment").mkdir(parents=True)
    (extra / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_epoch: 3\n")
    runs = [
        [*case[0], "threads=1", f"hydra.searchpath=[file://{extra}]", f"hydra.run.dir={tmp_path / f'r{i}'}"]
        for i, case in enumerate(CLI_CASES)
    ]
    halves = [runs[0::2], runs[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda h: _run_in_one_process(h, tmp_path), halves)
    outcomes = [None] * len(runs)
    outcomes[0::2], outcomes[1::2] = first, second
    problems = [
        _problem(CLI_CASES[i][0], CLI_CASES[i][1], rc, err, tmp_path / f"r{i}") for i, (rc, err) in enumerate(outcomes)
    ]
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_a_real_esq_train_process_exits_2_without_traceback(tmp_path: Path) -> None:
    cases = [
        (["+quant.bitz=1"], 2, ["error: quant.bitz: unknown key"]),
        # Hydra's own composition error, composed before Hydra does (cli/_common.py): one line too
        (["quant=bwm"], 2, ["error: quant=bwm: unknown option of group quant (did you mean 'bwn'?)"]),
    ]
    runs = [[*c[0], f"hydra.run.dir={tmp_path / f'r{i}'}"] for i, c in enumerate(cases)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda r: _run_cli(r, tmp_path), runs))
    for (overrides, code, needles), (rc, err) in zip(cases, outcomes):
        assert rc == code and "Traceback" not in err, (overrides, rc, err[-1500:])
        assert all(n in err for n in needles), (overrides, err[-1500:])
        if code == 2:
            assert len([line for line in err.splitlines() if line.strip()]) == 1, err


# ---- the same rules in-process (cheap, so many more of them) ----------------------------------------
IN_PROCESS: list[tuple[list[str], str]] = [
    (["quant.kind=full"], "quant.bits: 1 does not match quant.kind=full; allowed: 32"),
    (["quant=twn", "quant.bits=1"], "quant.bits: 1 does not match quant.kind=twn; allowed: 2"),
    (["quant=bwn", "quant.bits=3"], "quant.bits: 3 does not match quant.kind=bwn; allowed: 1"),
    (["quant.kind=uniform", "quant.bits=1"], "quant.bits: 1 does not match quant.kind=uniform; allowed: 2, 3, 4"),
    (["quant.bits=9"], "quant.bits: 9 is not allowed"),
    (["quant.act_bits=0"], "quant.act_bits: 0 is not allowed"),
    (["quant.per_filter=yes"], "quant.per_filter: 'yes' is not true or false"),
    (["callbacks.quant_ratio.start=1.5"], "callbacks.quant_ratio.start: 1.5 is out of range"),
    (["callbacks.pgd.step_size=0"], "callbacks.pgd.step_size: 0 is out of range"),
    (["callbacks.pgd.norm=l3"], "callbacks.pgd.norm: 'l3' is not allowed"),
    (
        ["+callbacks.checkpoint.every_n_epoch=1"],
        "callbacks.checkpoint.every_n_epoch: unknown key (did you mean 'every_n_epochs'?)",
    ),
    (["+callbacks.foo.x=1"], "callbacks.foo: no _target_"),
    (["callbacks.pgd=null"], "callbacks.pgd: null, but method=esq trains on x_adv"),
    (["method=alp", "+method.trades_beta=1"], "method.trades_beta: only used by method=trades"),
    (["method.alp_lambda=1"], "method.alp_lambda"),  # Hydra refuses the override without +
    (["pairing.layers=[]", "pairing.lambdas=[]"], "pairing.layers: [] pairs nothing"),
    (["pairing.p=3"], "pairing.p: 3 is not allowed; allowed: 1, 2"),
    (["optimizer.lr=0"], "optimizer.lr: 0 is out of range; allowed: 0 < lr"),
    (["optimizer.momentum=1"], "optimizer.momentum: 1 is out of range"),
    (["+optimizer.lrr=0.1"], "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    (["scheduler.T_max=0"], "scheduler.T_max: 0 is out of range"),
    (["data.batch_size=0"], "data.batch_size: 0 is out of range"),
    (["data.attack.eps=2"], "data.attack.eps: 2 is out of range"),
    (["data.attack.steps=-1"], "data.attack.steps: -1 is out of range"),
    (["data.val_size=1500", "data.test_size=300"], "data.val_size: 1500 with test_size=300 leaves no training data"),
    (["+data.data_dir=x"], "data.data_dir: unknown key"),
    (["model.width=0"], "model.width: 0 is out of range"),
    (["+model.widht=3"], "model.widht: unknown key (did you mean 'width'?)"),
    (["trainer.devices=0"], "trainer.devices: 0 is not allowed"),
    (["trainer.accelerator=gpux"], "trainer.accelerator: 'gpux' is not allowed"),
    (["+trainer.strategy=ddpp"], "trainer.strategy: 'ddpp' is not allowed"),
    (["trainer.precision=15"], "trainer.precision: 15 is not allowed"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches: 0 is not allowed"),
    (["+trainer.plugins=[]"], "trainer.plugins: set by esq-train itself"),
    (["+trainer.num_nodes=2"], "trainer.strategy: 'auto' cannot span 2 nodes"),
    (["seed=-1"], "seed: -1 is out of range"),
    (["threads=0"], "threads: 0 is not allowed"),
    (["init_from=setting:"], "init_from: 'setting:' is not allowed"),
    (
        ["callbacks.pgd.steps=0", "callbacks.pgd.random_start=false"],
        "callbacks.pgd.steps: 0 with random_start=false makes x_adv = x, so method=esq would train something other "
        "than it names (the pairing term is always zero)",
    ),
    (
        ["method=adversarial", "callbacks.pgd.steps=0", "callbacks.pgd.random_start=false"],
        "method=adversarial would train something other than it names (it trains on the clean inputs)",
    ),
    (["setting=NEB"], "setting: 'NEB' contradicts the run, which is 'EB'"),
    (["quant=twn", "setting=EB"], "setting: 'EB' contradicts the run, which is 'ET'"),
    (["init_seed=-1"], "init_seed: -1 is out of range"),
    (["pairing.warmup_epochs=-1"], "pairing.warmup_epochs: -1 is out of range"),
    (
        ["optimized_metric=robust_acc.pgd100"],
        "optimized_metric: robust_acc.pgd100 names an attack that eval.attacks does not run (fgsm, pgd20, pgd_margin, "
        "pgd_dlr, pgd_mt, pgd_pp, pgd_pairing)",
    ),
    (
        ["init_from=missing.ckpt"],
        "init_from: 'missing.ckpt' is not a file; allowed: a checkpoint file, or setting:NAME",
    ),
    (["++eval.params.pgd20.steps=0"], "eval.params.pgd20.steps: 0 is out of range; allowed: 1 <= steps"),
    (["experiment_name=${nope}"], "experiment_name: cannot resolve its value"),
    (["eval.attacks=[pgd]"], "eval.attacks[0]: 'pgd' is not an attack (did you mean 'pgd20'?)"),
    (["eval.norm=l1"], "eval.norm: 'l1' is not allowed"),
    (["eval.n_samples=0"], "eval.n_samples: 0 is out of range"),
    (["+eval.params.pgd20.stepz=1"], "eval.params.pgd20.stepz: unknown parameter of pgd20 (did you mean 'steps'?)"),
    (["+eval.params.pgd21.steps=1"], "eval.params.pgd21: 'pgd21' is not an attack"),
    (["eval.params.fgsm.eps=3"], "eval.params.fgsm.eps: 3 is out of range"),
    (["eval.transfer.attack=pgd"], "eval.transfer.attack: 'pgd' is not an attack"),
    (["eval.blackbox.budgets=[-1]"], "eval.blackbox.budgets: [-1] is out of range"),
    (["+logger.csv.save_dirr=x"], "logger.csv.save_dirr: unknown key (did you mean 'save_dir'?)"),
]


@pytest.mark.parametrize(("overrides", "expected"), IN_PROCESS, ids=[" ".join(c[0]) for c in IN_PROCESS])
def test_validate_config_rule(overrides: list[str], expected: str, tmp_path: Path) -> None:
    try:
        cfg = compose_config("train", overrides, tmp_path)
    except Exception as exc:
        assert expected.split(":")[0].split(" ")[0] in str(exc)
        return
    with pytest.raises(ESQUserError) as info:
        validate_config(cfg)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def _group_options() -> list[tuple[str, str]]:
    pairs = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        # scales/ and settings/ are parts of the experiment files, which are checked as such.
        if len(rel.parts) >= 2 and rel.parts[0] not in ("hydra", "paths", "scales", "settings"):
            pairs.append((rel.parts[0], "/".join(rel.with_suffix("").parts[1:])))
    return pairs


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_shipped_config_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option.startswith("cifar"):
        overrides.append("model=resnet20")
    if group == "pairing" and option.startswith("resnet152"):
        overrides += ["data=cifar100", "model=resnet152", "data.download=true"]  # names of ResNet-152's modules
    if group in ("data", "experiment") and "cifar" in option:
        overrides.append("data.download=true")  # data_dir is checked on disk unless downloading
    if group == "compress":
        overrides.append("experiment=digits/compress")  # a preset's budgets are the experiment's
    cfg = compose_config("train", overrides, tmp_path)
    if str(cfg.get("init_from") or "").endswith(".ckpt"):
        pytest.skip("points at a checkpoint file")
    validate_config(cfg)


def test_eval_config_is_validated_against_the_checkpoint_config(tmp_path: Path) -> None:
    from esq_lightning.commands.evaluate import run_config_with_eval

    train_cfg = compose_config("train", [], tmp_path / "t")
    train_config = OmegaConf.to_container(train_cfg, resolve=True)
    train_config.pop("hydra")
    good = compose_config("eval", ["ckpt_path=x.ckpt"], tmp_path / "e")
    assert run_config_with_eval(train_config, good).eval.eps == train_config["eval"]["eps"]
    for overrides, expected in [
        (["eval.attacks=[pgd21]"], "eval.attacks[0]: 'pgd21' is not an attack"),
        (["+data.batch_sizee=3"], "data.batch_sizee: unknown key"),
        (["+eval.bogus=1"], "eval.bogus: unknown key"),
        (["mode=whitebx"], "mode: 'whitebx' is not allowed"),
    ]:
        cfg = compose_config("eval", ["ckpt_path=x.ckpt", *overrides], tmp_path / "e")
        with pytest.raises(ESQUserError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            run_config_with_eval(train_config, cfg)


# ---- trainer.* is checked against the installed Lightning, not against a copy of its lists ---------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+trainer.strategy=ddpp"], "trainer.strategy: 'ddpp' is not allowed; allowed: 'auto', 'ddp'"),
        (["trainer.precision=15"], "trainer.precision: 15 is not allowed; allowed: null, 64, 32, 16"),
        (["trainer.precision=bf16-mixd"], "trainer.precision: 'bf16-mixd' is not allowed"),
        (["trainer.accelerator=gpux"], "trainer.accelerator: 'gpux' is not allowed; allowed: 'auto', 'gpu'"),
        (
            ["+trainer.max_epoch=3"],
            "trainer.max_epoch: unknown key (did you mean 'max_epochs'?); allowed keys of "
            "trainer: the arguments of pytorch_lightning.Trainer",
        ),
    ],
)
def test_bad_trainer_arguments_fail_in_one_line_naming_the_key(
    overrides: list[str], expected: str, tmp_path: Path
) -> None:
    cfg = compose_config("train", overrides, tmp_path)
    with pytest.raises(ESQUserError) as info:
        validate_config(cfg)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_trainer_values_come_from_lightnings_own_registries(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry

    # A strategy registered with Lightning is accepted at once; the schema holds no list of its own.
    cfg = compose_config("train", ["+trainer.strategy=esq_test_strategy"], tmp_path)
    with pytest.raises(ESQUserError, match="trainer.strategy: 'esq_test_strategy' is not allowed"):
        validate_config(cfg)
    StrategyRegistry.register("esq_test_strategy", SingleDeviceStrategy, device="cpu")
    try:
        validate_config(cfg)
    finally:
        StrategyRegistry.remove("esq_test_strategy")
    # Every argument of the installed Trainer is a valid key, declared in the schema or not.
    assert "max_time" not in schema.TrainerConfig.model_fields
    assert "max_time" in inspect.signature(pl.Trainer.__init__).parameters
    validate_config(compose_config("train", ["+trainer.max_time=00:00:10:00"], tmp_path / "t"))


def test_phase_one_reads_the_codes_own_tables() -> None:
    """The schema's choices are the code's tables (one definition, esq_lightning/config/choices.py)."""
    from esq_lightning.commands.evaluate import MODES
    from esq_lightning.config import choices
    from esq_lightning.pairing import DISTANCES
    from esq_lightning.quant.registry import FAMILIES
    from esq_lightning.training.objectives import METHODS

    assert FAMILIES is choices.QUANT_FAMILIES and METHODS is choices.METHODS and MODES is choices.EVAL_MODES
    assert list(DISTANCES) == list(choices.PAIRING_DISTANCES)


# ---- pydantic's errors as one line: values Hydra's overrides cannot produce ---------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data.batch_size", "???", "data.batch_size: ??? (no value given); set it, e.g. data.batch_size=..."),
        ("pairing.layers", ["logits", "${nope}"], "pairing.layers[1]: cannot resolve its value"),
        ("callbacks.pgd", 3, "callbacks.pgd: 3 is not a mapping; allowed: a callback config with _target_"),
        ("data.attack", None, "data.attack: null is not a mapping"),
        ("quant.bits", True, "quant.bits: true is not allowed; allowed: 1, 2, 3, 4, 5, 6, 7, 8, 32"),
        ("seed", 1.5, "seed: 1.5 is not an integer"),
        (
            "eval.blackbox.budgets",
            [0, -1],
            "eval.blackbox.budgets: [0, -1] (item -1) is out of range; allowed: 0 <= budgets",
        ),
        ("data.mean", [0.1, 0.2], "data.mean: 2 values for in_channels=1; allowed: one value per input channel"),
        ("quant.variant", None, "quant.variant: null is not allowed; allowed: 'paper', 'reference'"),
    ],
)
def test_phase_one_errors_name_the_key_in_one_line(key: str, value: object, expected: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [], tmp_path)
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ESQUserError) as info:
        validate_config(cfg, code_checks=False)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_a_key_the_yaml_leaves_out_is_missing_not_defaulted(tmp_path: Path) -> None:
    cfg = compose_config("train", [], tmp_path)
    OmegaConf.set_struct(cfg, False)
    del cfg.quant["variant"]
    with pytest.raises(ESQUserError, match=r"^quant\.variant: missing; it must be set$"):
        validate_config(cfg, code_checks=False)
