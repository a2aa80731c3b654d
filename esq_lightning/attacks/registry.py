"""Evaluation attacks by name, run in eval mode with frozen parameters, every parameter recorded."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import esq_lightning
from esq_lightning.attacks.nattack import nattack
from esq_lightning.attacks.pgd import pgd
from esq_lightning.attacks.spec import (
    BUDGETED,
    CE,
    GRADIENT_FREE,
    ITERATIVE,
    MINIMUM_NORM,
    SINGLE_STEP,
    AttackSpec,
    ParamRange,
    Params,
    count,
    positive,
    show,
)
from esq_lightning.attacks.utils import (
    as_autograd_input,
    canonical_norm,
    check_gradients,
    frozen_eval,
    grad_enabled,
    perturbation_norms,
)
from esq_lightning.errors import did_you_mean

__all__ = [
    "ATTACKS",
    "AttackOutput",
    "AttackSpec",
    "Attack",
    "run_attack",
    "accuracy_at_budgets",
    "accuracy_curve",
    "attack_title",
    "check_attack_names",
    "check_attack_params",
    "library_available",
    "register_attack",
    "unregister_attack",
]

# Distribution name on the package index -> import name.
_PACKAGES = {"foolbox": "foolbox", "pyautoattack": "pyautoattack"}


@dataclass
class AttackOutput:
    """Result of one evaluation attack on a batch.

    x_adv: adversarial inputs (x where a minimum-norm attack failed or the input was misclassified).
    correct: the model is correct on the clean input and on x_adv within the budget eps; for
        minimum-norm attacks, clean-correct and (attack failed or found norm > eps); with eps None,
        clean-correct and attack failed.
    norms: per-sample perturbation norm in the attack's norm; minimum-norm attacks give inf where
        they failed and 0 where the clean input is already misclassified.
    params: every parameter used, json-able (attack, kind, norm, eps, steps, ..., library, version).
    clean_correct: the model is correct on the clean input.
    """

    x_adv: Tensor
    correct: Tensor
    norms: Tensor
    params: dict[str, Any]
    clean_correct: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


class Attack:
    """A configured attack: `attack(model, x, y) -> AttackOutput`."""

    def __init__(self, spec: AttackSpec, eps: float | None, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(spec.defaults))
        if unknown:
            raise ValueError(
                f"attack {spec.name!r} got unknown parameters {unknown}; "
                f"valid: {sorted(spec.defaults)}"
            )
        self.spec = spec
        self.params: dict[str, Any] = {**spec.defaults, **params}
        if "norm" in self.params:
            self.params["norm"] = canonical_norm(self.params["norm"])
        self.norm: str = self.params.get("norm", spec.norm)
        self.eps = spec.default_eps if eps is None else float(eps)
        if spec.kind == BUDGETED and self.eps is None:
            raise ValueError(f"attack {spec.name!r} is budgeted: give eps")
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"eps must be non-negative, got {self.eps}")
        self.library_version = _require(spec.library, spec.name)

    def record(self, n_inputs: int) -> dict[str, Any]:
        """The json-able parameter record of this attack."""
        return {
            "attack": self.spec.name,
            "kind": self.spec.kind,
            "norm": self.norm,
            "eps": self.eps,
            **{k: v for k, v in self.params.items() if k != "norm"},
            "library": self.spec.library,
            "library_version": self.library_version,
            "torch_version": torch.__version__,
            "n_inputs": n_inputs,
        }

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> AttackOutput:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("inputs must lie in [0, 1]: normalisation belongs inside the model")
        params = self.record(len(x))
        start = time.perf_counter()
        with grad_enabled(), frozen_eval(model), _seeded(self.params.get("seed", 0), x.device):
            # Plain tensors, also when called from Lightning's inference-mode validation.
            x, y = as_autograd_input(x), as_autograd_input(y)
            with torch.no_grad():
                clean_pred = _predict(model, x)
            clean_correct = clean_pred == y
            if self.spec.gradient_based and len(x):
                check_gradients(model, x, y)
            if self.spec.kind == MINIMUM_NORM:
                # Misclassified inputs need no search: they are adversarial at norm 0.
                idx = clean_correct.nonzero().squeeze(1)
                x_adv = x.clone()
                extra: dict[str, Any] = {}
                if idx.numel():
                    found, extra = self.spec.runner(model, x[idx], y[idx], self.eps, self.params)
                    x_adv[idx] = found.detach().to(x.dtype)
            else:
                x_adv, extra = self.spec.runner(model, x, y, self.eps, self.params)
                x_adv = x_adv.detach().to(x.dtype)
            _check_box(x_adv, self.spec.name)
            with torch.no_grad():
                adv_pred = _predict(model, x_adv)
            norms = perturbation_norms(x_adv, x, self.norm)
            if self.spec.kind == MINIMUM_NORM:
                fooled = adv_pred != y
                x_adv = torch.where(_per_sample(fooled, x), x_adv, x)
                norms = torch.where(fooled, norms, torch.full_like(norms, math.inf))
                norms = torch.where(clean_correct, norms, torch.zeros_like(norms))
                within = norms > self.eps if self.eps is not None else norms.isinf()
                correct = clean_correct & within
            else:
                _check_budget(norms, self.eps, self.spec.name)
                correct = clean_correct & (adv_pred == y)
        params.update(extra)
        params["runtime_s"] = round(time.perf_counter() - start, 3)
        return AttackOutput(
            x_adv=x_adv.detach(),
            correct=correct,
            norms=norms.detach(),
            params=params,
            clean_correct=clean_correct,
        )


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _check_box(x_adv: Tensor, name: str) -> None:
    if x_adv.numel() and (x_adv.min() < 0 or x_adv.max() > 1 or not torch.isfinite(x_adv).all()):
        raise RuntimeError(f"attack {name!r} returned inputs outside [0, 1]")


def _check_budget(norms: Tensor, eps: float | None, name: str) -> None:
    # A float32 clamp can land one ulp outside the ball: tolerate that, nothing more.
    if eps is not None and norms.numel() and norms.max() > eps * (1 + 1e-5) + 1e-6:
        raise RuntimeError(
            f"attack {name!r} exceeded its budget: max norm {norms.max().item():.6g} > eps {eps}"
        )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs the libraries draw from, and leave the caller's RNG state untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _require(library: str, attack: str) -> str:
    """Import a library lazily; return its version or raise a one-line install hint."""
    if library == "esq_lightning":
        return esq_lightning.__version__
    try:
        with warnings.catch_warnings():
            # foolbox 3.3.4 imports scipy.ndimage.filters, deprecated in scipy 1.x.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(_PACKAGES.get(library, library))
    except ImportError:
        raise ImportError(
            f"attack {attack!r} needs the package {library}: pip install 'esq-lightning[attacks]'"
        ) from None
    return str(getattr(module, "__version__", "unknown"))


def _foolbox() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import foolbox

    return foolbox


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    # CPU by default: the same draws whatever the accelerator. N Attack draws population x input
    # size normals per iteration and would spend its time copying them, so it draws on x's device.
    return torch.Generator(device=device).manual_seed(int(seed))


# --- runners ---------------------------------------------------------------------------------


def _run_fgsm(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    assert eps is not None
    x_adv = pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm=p["norm"], random_start=False)
    return x_adv, {"steps": 1, "step_size": eps, "random_start": False}


def _run_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    """PGD with restarts: a sample is robust only if it survives every restart."""
    assert eps is not None
    generator = _generator(p["seed"])
    # An absolute step_size when given, else a fraction of eps (the threat model decides the step).
    step_size = p["step_size"] if p.get("step_size") is not None else p["step_fraction"] * eps
    x_adv = x.clone()
    remaining = torch.arange(len(x), device=x.device)
    for _ in range(p["restarts"]):
        if remaining.numel() == 0:
            break
        found = pgd(
            model, x[remaining], y[remaining], eps=eps, step_size=step_size, steps=p["steps"],
            norm=p["norm"], random_start=p["random_start"], generator=generator,
        )
        x_adv[remaining] = found
        with torch.no_grad():
            still = _predict(model, found) == y[remaining]
        remaining = remaining[still]
    return x_adv, {"step_size": step_size}


def _run_ddn(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    attack = fb.attacks.DDNAttack(
        init_epsilon=p["init_epsilon"], steps=p["steps"], gamma=p["gamma"]
    )
    return attack.run(fmodel, x, fb.criteria.Misclassification(y)), {}


def _run_cw(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=p["binary_search_steps"], steps=p["steps"], stepsize=p["stepsize"],
        confidence=p["confidence"], initial_const=p["initial_const"], abort_early=p["abort_early"],
    )
    x_adv = attack.run(fmodel, x, fb.criteria.Misclassification(y))
    # foolbox returns an all-zero image where C&W found nothing; a black image is usually
    # misclassified and would pass as an "adversarial" at norm ||x||: mark it as a failure.
    failed = (x_adv.flatten(1) == 0).all(dim=1) & (x.flatten(1) != 0).any(dim=1)
    return torch.where(_per_sample(failed, x), x, x_adv), {}


def _run_boundary(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    init = fb.attacks.LinearSearchBlendedUniformNoiseAttack(
        directions=p["init_directions"], steps=p["init_steps"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # we handle the failures below
        starts = init.run(fmodel, x, fb.criteria.Misclassification(y))
    with torch.no_grad():
        ok = _predict(model, starts) != y
        if not ok.all():
            # Where uniform noise never changes the class, start from the nearest input of the
            # batch that the model gives another class (the usual decision-based initialisation).
            pred = _predict(model, x)
            dist = torch.cdist(x.flatten(1), x.flatten(1))
            dist = dist.masked_fill(pred[None, :] == y[:, None], math.inf)
            nearest = dist.argmin(dim=1)
            fallback = ~ok & torch.isfinite(dist.gather(1, nearest[:, None]).squeeze(1))
            starts[fallback] = x[nearest[fallback]]
            ok = ok | fallback
    x_adv = x.clone()
    idx = ok.nonzero().squeeze(1)
    if idx.numel():
        attack = fb.attacks.BoundaryAttack(
            steps=p["steps"], spherical_step=p["spherical_step"], source_step=p["source_step"],
            source_step_convergance=p["source_step_convergence"],
            step_adaptation=p["step_adaptation"], update_stats_every_k=p["update_stats_every_k"],
        )
        x_adv[idx] = attack.run(
            fmodel, x[idx], fb.criteria.Misclassification(y[idx]), starting_points=starts[idx]
        )
    return x_adv, {"init_failed": int((~ok).sum().item())}


def _run_nattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    assert eps is not None
    x_adv, queries = nattack(
        model, x, y, eps=eps, norm=p["norm"], max_iter=p["max_iter"], population=p["population"],
        sigma=p["sigma"], lr=p["lr"], generator=_generator(p["seed"], x.device),
    )
    q = queries.float()
    return x_adv, {
        "max_queries": 1 + p["max_iter"] * (p["population"] + 1),
        "queries_mean": round(q.mean().item(), 1) if len(q) else 0.0,
        "queries_max": int(queries.max().item()) if len(q) else 0,
    }


def _aa_norm(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2"}[norm]


def _run_square(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(
        model, norm=_aa_norm(p["norm"]), n_queries=p["n_queries"], eps=eps, p_init=p["p_init"],
        n_restarts=p["restarts"], seed=p["seed"], verbose=False, loss=p["loss"],
        resc_schedule=p["rescale_schedule"], device=x.device,
    )
    with torch.no_grad():
        return attack.perturb(x, y), {}


def _run_autoattack(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params
) -> tuple[Tensor, Params]:
    from pyautoattack import AutoAttack

    adversary = AutoAttack(
        model, eps=eps, norm=_aa_norm(p["norm"]), version="standard", seed=p["seed"],
        device=x.device,
    )
    # AutoAttack's own checks (its flags_doc.md) warn with warnings.warn: keep them as its flags.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=p["batch_size"])
    aa_flags = sorted({str(w.message) for w in caught if w.category is Warning or issubclass(w.category, Warning)
                       and "autoattack" in str(w.filename).lower()})
    return x_adv, {
        "flags": aa_flags,
        "version": "standard",
        "attacks_run": list(adversary.attacks_to_run),
        "apgd_steps": adversary.apgd.n_iter,
        "apgd_targets": adversary.apgd_targeted.n_target_classes,
        "fab_targets": adversary.fab.n_target_classes,
        "square_queries": adversary.square.n_queries,
    }


# --- query budgets of the black-box attacks (model queries per input, stated with every curve) ----------------


def _boundary_queries(record: Mapping[str, Any]) -> dict[str, Any]:
    steps, k = int(record["steps"]), max(int(record.get("update_stats_every_k", 10)), 1)
    # One query per step, one more every k steps for the spherical statistics, plus the initialisation
    # (up to init_directions noise draws and init_steps of line search).
    bound = steps + math.ceil(steps / k) + int(record["init_directions"]) + int(record["init_steps"])
    return {"steps": steps, "max_queries": bound, "text": f"{steps} steps, <= {bound} queries"}


def _nattack_queries(record: Mapping[str, Any]) -> dict[str, Any]:
    q = int(record.get("max_queries", 1 + int(record["max_iter"]) * (int(record["population"]) + 1)))
    return {"max_iter": int(record["max_iter"]), "population": int(record["population"]), "max_queries": q,
            "text": f"<= {q} queries per budget"}


def _square_queries(record: Mapping[str, Any]) -> dict[str, Any]:
    q = int(record["n_queries"])
    return {"max_queries": q, "text": f"<= {q} queries per budget"}


# The parameters of the in-house PGD (here and in attacks/adaptive.py).
PGD_RANGES: dict[str, ParamRange] = {"steps": count(), "step_size": positive(), "step_fraction": positive(),
                                     "restarts": count()}

# --- the registry: one AttackSpec per attack (attacks/adaptive.py registers its own) ----------------------------

ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in [
        AttackSpec(
            name="fgsm", kind=BUDGETED, norm="linf", library="esq_lightning", gradient_based=True,
            default_eps=16 / 255, defaults={"norm": "linf"}, runner=_run_fgsm,
            description="FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps.",
            family=SINGLE_STEP, loss=CE, nesting=0, title="FGSM",
        ),
        AttackSpec(
            name="pgd20", kind=BUDGETED, norm="linf", library="esq_lightning", gradient_based=True,
            default_eps=8 / 255,
            defaults={"norm": "linf", "steps": 20, "step_size": None, "step_fraction": 0.25,
                      "random_start": True, "restarts": 1, "seed": 0},
            runner=_run_pgd,
            description="PGD (Madry et al. 2018), 20 steps of eps/4 (2/255 at 8/255), uniform random start.",
            family=ITERATIVE, loss=CE, nesting=1, title="PGD-20", ranges=PGD_RANGES,
        ),
        AttackSpec(
            name="pgd100", kind=BUDGETED, norm="linf", library="esq_lightning", gradient_based=True,
            default_eps=8 / 255,
            defaults={"norm": "linf", "steps": 100, "step_size": None, "step_fraction": 0.25,
                      "random_start": True, "restarts": 5, "seed": 0},
            runner=_run_pgd,
            description="PGD, 100 steps, robust only if every random restart fails.",
            family=ITERATIVE, loss=CE, nesting=1, title="PGD-100", ranges=PGD_RANGES,
        ),
        AttackSpec(
            name="ddn", kind=MINIMUM_NORM, norm="l2", library="foolbox", gradient_based=True,
            default_eps=1.0, defaults={"steps": 100, "init_epsilon": 1.0, "gamma": 0.05, "seed": 0},
            runner=_run_ddn,
            description="DDN (Rony et al. 2019), minimum L2 norm, foolbox.",
            family=ITERATIVE, title="DDN", ranges={"steps": count()},
        ),
        AttackSpec(
            name="cw", kind=MINIMUM_NORM, norm="l2", library="foolbox", gradient_based=True,
            default_eps=1.0,
            defaults={"steps": 20, "binary_search_steps": 9, "stepsize": 0.1, "confidence": 0.0,
                      "initial_const": 1e-3, "abort_early": False, "seed": 0},
            runner=_run_cw,
            description="Carlini-Wagner L2 with binary search over c, minimum L2 norm, foolbox.",
            family=ITERATIVE, title="C&W",
            ranges={"steps": count(), "binary_search_steps": count(), "stepsize": positive()},
        ),
        AttackSpec(
            name="boundary", kind=MINIMUM_NORM, norm="l2", library="foolbox", gradient_based=False,
            default_eps=None,
            defaults={"steps": 25000, "spherical_step": 1e-2, "source_step": 1e-2,
                      "source_step_convergence": 1e-7, "step_adaptation": 1.5,
                      "update_stats_every_k": 10, "init_directions": 1000, "init_steps": 1000,
                      "seed": 0},
            runner=_run_boundary,
            description="Boundary attack (Brendel et al. 2018), decision-based, min L2, foolbox.",
            family=GRADIENT_FREE, title="Boundary", query_budget=_boundary_queries, plot_style="-",
            ranges={"steps": count()},
        ),
        AttackSpec(
            name="nattack", kind=BUDGETED, norm="l2", library="esq_lightning", gradient_based=False,
            default_eps=None,
            defaults={"norm": "l2", "max_iter": 500, "population": 300, "sigma": 0.1, "lr": 0.02,
                      "seed": 0},
            runner=_run_nattack,
            description="N Attack (Li et al. 2019), score-based NES, budgeted, in-house.",
            family=GRADIENT_FREE, title="N Attack", query_budget=_nattack_queries, plot_style="--",
            ranges={"max_iter": count(), "population": count()},
        ),
        AttackSpec(
            name="square", kind=BUDGETED, norm="linf", library="pyautoattack", gradient_based=False,
            default_eps=8 / 255,
            defaults={"norm": "linf", "n_queries": 5000, "p_init": 0.8, "restarts": 1,
                      "loss": "margin", "rescale_schedule": True, "seed": 0},
            runner=_run_square,
            description="Square attack (Andriushchenko et al. 2020), score-based, pyautoattack.",
            family=GRADIENT_FREE, title="Square", query_budget=_square_queries,
            ranges={"n_queries": count(), "restarts": count()},
        ),
        AttackSpec(
            name="autoattack", kind=BUDGETED, norm="linf", library="pyautoattack",
            gradient_based=True, default_eps=8 / 255,
            defaults={"norm": "linf", "batch_size": 500, "seed": 0},
            runner=_run_autoattack,
            description="AutoAttack standard (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square.",
            family=ITERATIVE, nesting=2, title="AutoAttack",
        ),
    ]
}


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add an attack to the registry: esq-eval, the masking report, the checks, esq-report and the config check
    see it at once. A name already taken is refused (unregister_attack it first)."""
    if not isinstance(spec, AttackSpec):
        raise TypeError(f"register_attack takes an AttackSpec, got {type(spec).__name__}")
    if spec.name in ATTACKS:
        raise ValueError(f"attack {spec.name!r} is already registered ({ATTACKS[spec.name].description}); "
                         f"unregister_attack({spec.name!r}) first, or give the new attack another name")
    ATTACKS[spec.name] = spec
    return spec


def unregister_attack(name: str) -> AttackSpec:
    """Remove an attack from the registry and return its spec (a test's teardown, a plugin replacing one)."""
    if name not in ATTACKS:
        raise KeyError(f"attack {name!r} is not registered; registered: {', '.join(ATTACKS)}")
    return ATTACKS.pop(name)


def attack_spec(name: str) -> AttackSpec | None:
    """The spec of a registered attack, None for any other name (an attack of an older run, a probe)."""
    return ATTACKS.get(str(name))


def attack_title(name: str) -> str:
    """An attack's title (its column header in esq-report); the name itself when it is not registered."""
    spec = ATTACKS.get(str(name))
    return spec.title if spec is not None else str(name)


def library_available(spec: AttackSpec) -> bool:
    """The attack's library can be imported (the in-house ones always)."""
    return spec.library == "esq_lightning" or importlib.util.find_spec(_PACKAGES.get(spec.library, spec.library)) is not None


# --- the config check of attack names and parameters (config/schema.py delegates here) --------------------------


def check_attack_names(names: list[Any], key: str) -> None:
    """Every name is a registered attack; else ESQUserError naming the key (and its index in a list)."""
    from esq_lightning.errors import ESQUserError

    allowed = list(ATTACKS)
    for i, name in enumerate(names):
        if name not in ATTACKS:
            where = f"{key}[{i}]" if len(names) > 1 or key.endswith("attacks") else key
            raise ESQUserError(f"{where}: {show(name)} is not an attack{did_you_mean(str(name), allowed)}; "
                               f"allowed: {', '.join(allowed)}")


def check_attack_params(params: Any, key: str, budgeted: bool = True) -> None:
    """Per-attack parameters (a mapping attack -> parameters, a DictConfig or a dict): known attacks, parameters
    their spec takes, values within the spec's ranges. `budgeted=False` (black-box curves) refuses eps, which
    the budgets give. The first problem raises ESQUserError (one line, naming the key)."""
    from esq_lightning.errors import ESQUserError

    if params is None:
        return
    if not isinstance(params, Mapping):
        raise ESQUserError(f"{key}: {show(params)} is not a mapping; allowed: attack name -> parameters")
    names = list(ATTACKS)
    for name in params.keys():
        pkey = f"{key}.{name}"
        if name not in ATTACKS:
            raise ESQUserError(f"{pkey}: {str(name)!r} is not an attack{did_you_mean(str(name), names)}; "
                               f"allowed: {', '.join(names)}")
        spec = ATTACKS[str(name)]
        entry = _value(params, str(name), key)
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise ESQUserError(f"{pkey}: {show(entry)} is not a mapping; allowed: parameters of {name}")
        allowed = ["eps", *spec.defaults] if budgeted else list(spec.defaults)
        for p in entry.keys():
            p = str(p)
            if p not in allowed:
                raise ESQUserError(f"{pkey}.{p}: unknown parameter of {name}{did_you_mean(p, allowed)}; "
                                   f"allowed: {', '.join(allowed)}")
            value = _value(entry, p, pkey)
            rule = spec.ranges.get(p)
            if p == "eps":
                norm = _value(entry, "norm", pkey) if "norm" in entry else spec.norm
                rule = (ParamRange(float, gt=0, le=1, note="an L_inf radius within the input range [0, 1]")
                        if str(norm).lower() in ("linf", "inf") else positive())
            # null: the attack's default (eps from the threat model, step_size from step_fraction x eps)
            if rule is not None:
                rule.check(value, f"{pkey}.{p}")


def _value(node: Mapping[str, Any], sub: str, key: str) -> Any:
    """node[sub], resolved; a missing value or an interpolation that cannot resolve is a user error naming the key."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from esq_lightning.errors import ESQUserError

    where = f"{key}.{sub}" if key else sub
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, sub):
        raise ESQUserError(f"{where}: missing; it must be set")
    try:
        return node[sub]
    except OmegaConfBaseException as exc:
        text = str(exc).strip()
        raise ESQUserError(f"{where}: cannot resolve its value: "
                           f"{text.splitlines()[0] if text else type(exc).__name__}") from None


def run_attack(
    name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float | None = None, **params: Any
) -> AttackOutput:
    """Run the named evaluation attack on (x, y); eps None takes the attack's default budget."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")
    return ATTACKS[name](eps, **params)(model, x, y)


def accuracy_at_budgets(
    output: AttackOutput, clean_correct: Tensor, budgets: list[float]
) -> list[float]:
    """Accuracy at each budget: clean-correct and (attack failed or found norm > budget).

    Exact for minimum-norm attacks at any budget. A budgeted attack only answers for its own eps
    (its x_adv says nothing about smaller budgets and under-uses larger ones): use accuracy_curve.
    """
    n = len(output.norms)
    if n == 0:
        return [math.nan for _ in budgets]
    clean_correct = clean_correct.to(output.norms.device).bool()
    if output.params.get("kind") == MINIMUM_NORM:
        return [(clean_correct & (output.norms > b)).float().mean().item() for b in budgets]
    eps = output.params.get("eps")
    if any(eps is None or not math.isclose(b, eps, rel_tol=1e-6, abs_tol=1e-9) for b in budgets):
        raise ValueError(
            f"budgeted attack {output.params.get('attack')!r} ran at eps={eps}: it gives accuracy "
            "at that budget only; use accuracy_curve for several budgets"
        )
    return [(clean_correct & output.correct).float().mean().item() for _ in budgets]


def accuracy_curve(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    budgets: list[float],
    **params: Any,
) -> tuple[list[float], dict[str, Any]]:
    """Accuracy at each budget (e.g. L2 0..4 for the black-box curves) and the parameter record.

    Minimum-norm attacks run once. Budgeted attacks run once per budget in increasing order, each
    only on the samples that survived the previous budget: an adversarial within a smaller ball is
    one within a larger ball, so this is sound and saves queries. Budget 0 is clean accuracy.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")
    spec = ATTACKS[name]
    if not budgets:
        return [], {}
    if spec.kind == MINIMUM_NORM:
        out = spec(None, **params)(model, x, y)
        record = {**out.params, "eps": None, "budgets": list(budgets)}
        return accuracy_at_budgets(out, out.clean_correct, budgets), record
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    with torch.no_grad(), frozen_eval(model):
        robust = _predict(model, x) == y
    accuracies = [0.0] * len(budgets)
    record = spec(max(budgets), **params).record(len(x))
    runtime = 0.0
    for i in order:
        b = budgets[i]
        idx = robust.nonzero().squeeze(1)
        if b > 0 and idx.numel():
            out = spec(b, **params)(model, x[idx], y[idx])
            robust[idx] = out.correct.to(robust.device)
            record.update({k: v for k, v in out.params.items() if k not in ("eps", "n_inputs")})
            runtime += out.params["runtime_s"]
        accuracies[i] = robust.float().mean().item() if len(robust) else math.nan
    record["eps"] = None
    record["runtime_s"] = round(runtime, 3)
    record["budgets"] = list(budgets)
    record["n_inputs"] = len(x)
    return accuracies, record
