"""`python -m benchmarks.run [--smoke]`: the performance ratios of issue #7 in one run, printed and written as JSON."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # `python benchmarks/run.py` works as well as `python -m benchmarks.run`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    FULL,
    SMOKE,
    Clock,
    Settings,
    build_base_model,
    device_of,
    load_average,
    machine_info,
    median,
    preloaded_batches,
    quantized_copy,
    settings_dict,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Ratio:
    """One reported ratio: median step time of `num` over that of `den` (lower is better unless higher_is_better)."""

    key: str
    title: str
    num: str
    den: str
    target: float
    higher_is_better: bool = False
    meaning: str = ""


RATIOS: tuple[Ratio, ...] = (
    Ratio(
        "framework_overhead",
        "Lightning ESQ step / hand-written PyTorch step",
        "lightning_esq",
        "hand_esq",
        1.03,
        meaning="ESQModule under a real pl.Trainer against the same arithmetic in a plain loop",
    ),
    Ratio(
        "esq_vs_madry",
        "error-silenced step / Madry adversarial step",
        "hand_esq",
        "hand_madry",
        1.10,
        meaning="ESQ adds one clean forward/backward to PGD + adversarial forward/backward",
    ),
    Ratio(
        "sq_overhead",
        "quantized step (SQ ratio r) / full-precision step",
        "hand_esq",
        "hand_esq_fp",
        1.05,
        meaning="per-step SQ draw + quantizing weights in every forward, ESQ objective both sides",
    ),
    Ratio(
        "pgd_vs_torchattacks",
        "PGD throughput: ours / torchattacks",
        "pgd_torchattacks",
        "pgd_ours",
        1.0,
        higher_is_better=True,
        meaning="time of torchattacks.PGD over ours, same model, batch, eps, steps",
    ),
    Ratio(
        "data_pipeline",
        "Lightning step with datamodule / with pre-loaded tensors",
        "lightning_esq_datamodule",
        "lightning_esq",
        1.02,
        meaning="TensorDataModule (shuffle, batched crop/flip) against ready batches",
    ),
)
RATIO_KEYS = tuple(r.key for r in RATIOS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure esq-lightning's performance ratios (docs/performance.md). Defaults: the full form.",
    )
    p.add_argument("--smoke", action="store_true", help="reduced form for CI: SmallCNN on 8x8 inputs, PGD-2, 1 round")
    p.add_argument("--model", help=f"architecture (default {FULL.model}; smoke {SMOKE.model})")
    p.add_argument("--batch", type=int, help=f"batch size (default {FULL.batch})")
    p.add_argument("--image-size", type=int, help="input height = width (default: 32, smoke 8)")
    p.add_argument("--in-channels", type=int, help="input channels (default: 3, smoke 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--precision", choices=["32", "bf16"], help="float32, or bf16 autocast as trainer.precision=bf16-mixed"
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs in every variant")
    p.add_argument("--quant", choices=["bwn", "twn"], help="quantizer of the quantized variants (default bwn)")
    p.add_argument("--ratio", type=float, help=f"SQ ratio of the quantized variants (default {FULL.ratio})")
    p.add_argument("--pgd-steps", type=int, help=f"training PGD steps (default {FULL.pgd_steps})")
    p.add_argument("--steps", type=int, help=f"timed steps per variant and round (default {FULL.steps})")
    p.add_argument("--warmup", type=int, help=f"untimed steps at the start of every run (default {FULL.warmup})")
    p.add_argument("--rounds", type=int, help=f"rounds; each runs both sides of every ratio (default {FULL.rounds})")
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        help="wall time (default), or this process's CPU time: steadier on a shared CPU at 1 thread",
    )
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(RATIO_KEYS)}, memory")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = SMOKE if args.smoke else FULL
    overrides = {
        "model": args.model,
        "batch": args.batch,
        "image_size": args.image_size,
        "in_channels": args.in_channels,
        "device": args.device,
        "threads": args.threads,
        "precision": args.precision,
        "quant": args.quant,
        "ratio": args.ratio,
        "pgd_steps": args.pgd_steps,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "clock": args.clock,
    }
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    if args.channels_last:
        s = replace(s, channels_last=True)
    if s.steps < 1 or s.rounds < 1 or s.warmup < 0:
        raise SystemExit("--steps and --rounds must be >= 1, --warmup >= 0")
    return s


def wanted(args: argparse.Namespace) -> set[str]:
    if not args.only:
        return {*RATIO_KEYS, "memory"}
    names = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = names - {*RATIO_KEYS, "memory"}
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; choose from {', '.join(RATIO_KEYS)}, memory")
    return names


def torchattacks_available() -> bool:
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return False
    return True


def build_variants(s: Settings, ratios: list[Ratio]) -> dict[str, Any]:
    """Every timed variant the chosen ratios need, each on its own copy of one initial model."""
    from benchmarks.cases import HandLoop, LightningRun, PGDRun

    needed = {name for r in ratios for name in (r.num, r.den)}
    base = build_base_model(s)
    quantized = quantized_copy(base, s)
    makers: dict[str, Callable[[], Any]] = {
        "hand_esq": lambda: HandLoop(copy.deepcopy(quantized), "esq", s),
        "hand_madry": lambda: HandLoop(copy.deepcopy(quantized), "adversarial", s, time_attack=True),
        "hand_esq_fp": lambda: HandLoop(copy.deepcopy(base), "esq", s),
        "lightning_esq": lambda: LightningRun(copy.deepcopy(quantized), s, data="tensors"),
        "lightning_esq_datamodule": lambda: LightningRun(copy.deepcopy(quantized), s, data="datamodule"),
        "pgd_ours": lambda: PGDRun(quantized, s, "ours"),
        "pgd_torchattacks": lambda: PGDRun(quantized, s, "torchattacks"),
    }
    return {name: makers[name]() for name in makers if name in needed}


def time_pairs(
    s: Settings, ratios: list[Ratio], variants: dict[str, Any], log: Callable[[str], None]
) -> tuple[dict[str, dict[str, list[list[float]]]], dict[str, list[float]]]:
    """Per ratio, per side and per round, the timed step durations (warm-up steps dropped); and, from the
    variant that times its parts (hand_madry), the attack and the loss forward/backward inside its steps.

    The two sides of a ratio run back to back in every round, in alternating order, so a shared machine's
    load changes hit both sides alike; a variant used by several ratios is run again for each of them.
    """
    total = s.warmup + s.steps
    batches = preloaded_batches(s, total + 1)
    times: dict[str, dict[str, list[list[float]]]] = {r.key: {r.num: [], r.den: []} for r in ratios}
    parts: dict[str, list[float]] = {}
    for rnd in range(s.rounds):
        for r in ratios:
            for name in (r.den, r.num) if rnd % 2 == 0 else (r.num, r.den):
                t0 = time.perf_counter()
                variant = variants[name]
                durations = variant.run(batches, total)[s.warmup :]
                times[r.key][name].append(durations)
                if getattr(variant, "time_attack", False):
                    parts.setdefault(f"{name}/attack", []).extend(variant.attack_times[s.warmup :])
                    parts.setdefault(f"{name}/loss_forward_backward", []).extend(variant.loss_times[s.warmup :])
                log(
                    f"  round {rnd + 1}/{s.rounds} {r.key:<20} {name:<25} median {median(durations):8.4f} s/step"
                    f"  ({time.perf_counter() - t0:5.1f} s)"
                )
    return times, parts


def ratio_result(r: Ratio, times: dict[str, list[list[float]]]) -> dict[str, Any]:
    """The ratio is the median over rounds of the per-round ratio of medians: robust to drift between rounds."""
    num = median([t for run in times[r.num] for t in run])
    den = median([t for run in times[r.den] for t in run])
    per_round = [median(a) / median(b) for a, b in zip(times[r.num], times[r.den])]
    value = median(per_round)
    meets = value >= r.target if r.higher_is_better else value <= r.target
    return {
        "title": r.title,
        "value": value,
        "target": r.target,
        "target_op": ">=" if r.higher_is_better else "<=",
        "meets_target": bool(meets),
        "numerator": r.num,
        "denominator": r.den,
        "numerator_median_s": num,
        "denominator_median_s": den,
        "ratio_of_pooled_medians": num / den,
        "per_round": per_round,
        "meaning": r.meaning,
    }


def esq_madry_floor(
    ratios: dict[str, dict[str, Any]], parts: dict[str, list[float]], pgd_steps: int
) -> dict[str, float] | None:
    """The ESQ/Madry ratio that the arithmetic alone implies, from timings taken inside the Madry steps.

    ESQ does what Madry does plus one more training forward/backward (the clean pass), so
    ESQ / Madry ~ 1 + t_loss / t_madry, t_loss being the Madry step's loss forward/backward. The issue's
    1.09 assumes a PGD step costs as much as a training step (1 + 1 / (10 + 1)); ours costs less (input
    gradient only with frozen weights, eval-mode BatchNorm, weights quantized once per attack).
    """
    madry = ratios.get("esq_vs_madry")
    if not madry or not parts.get("hand_madry/attack"):
        return None
    t_madry = madry["denominator_median_s"]
    t_attack, t_loss = median(parts["hand_madry/attack"]), median(parts["hand_madry/loss_forward_backward"])
    floor = 1 + t_loss / t_madry
    return {
        "floor": floor,
        "measured_over_floor": madry["value"] / floor,
        "attack_median_s": t_attack,
        "loss_forward_backward_median_s": t_loss,
        "pgd_step_over_training_step": t_attack / max(1, pgd_steps) / max(t_loss, 1e-12),
    }


def diagnostics(s: Settings) -> dict[str, float]:
    """Costs that explain the SQ ratio: one draw_selection (all layers) and one quantization of all layers."""
    from esq_lightning.quant import draw_selection, quant_layers
    from esq_lightning.rng import step_generator

    model = quantized_copy(build_base_model(s), s)
    clock = Clock(device_of(s), s.clock)

    def timed(fn: Callable[[], Any], n: int = 20) -> float:
        fn()
        out = []
        for _ in range(n):
            t0 = clock.now()
            fn()
            out.append(clock.now() - t0)
        return median(out)

    layers = [layer for _, layer in quant_layers(model)]
    with torch.no_grad():
        quantize = timed(lambda: [layer.effective_weight() for layer in layers])
    draw = timed(lambda: draw_selection(model, step_generator(s.seed, 0, 0)))
    return {
        "sq_draw_selection_ms": draw * 1e3,
        "effective_weights_all_layers_ms": quantize * 1e3,
        "quant_layers": len(layers),
    }


def memory_section(s: Settings) -> dict[str, Any]:
    from benchmarks.cases import esq_memory

    base = build_base_model(s)
    model = quantized_copy(base, s)
    pairing = s.memory_pairing or list(model.residual_module_names())
    batch = preloaded_batches(s, 1)[0]
    logits = esq_memory(model, batch, s, ["logits"])
    many = esq_memory(model, batch, s, ["logits", *pairing])
    extra = many["saved_activation_bytes"] - logits["saved_activation_bytes"]
    out = {
        "logits": logits,
        "many": many,
        "paired_modules": len(pairing),
        "ratio_many_over_logits": many["saved_activation_bytes"] / max(1, logits["saved_activation_bytes"]),
        "extra_bytes": extra,
        # 1.0 = each paired module keeps exactly one more activation-sized tensor (the difference
        # F(x) - F(x_adv) that the norm's backward needs); more would mean something is kept alive needlessly.
        "extra_per_paired_output_byte": extra / max(1, many["paired_output_bytes"]),
    }
    if "cuda_peak_bytes" in logits:
        out["cuda_peak_ratio"] = many["cuda_peak_bytes"] / max(1, logits["cuda_peak_bytes"])
    return out


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f} MB"


def format_report(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        "",
        f"esq-lightning benchmark ({'smoke' if result['smoke'] else 'full'}): {s['model']}, batch {s['batch']}, "
        f"{s['in_channels']}x{s['image_size']}x{s['image_size']}, {s['device']}, {m['torch_threads']} thread(s), "
        f"{'bf16 autocast' if s['precision'] == 'bf16' else 'fp32'}{', channels_last' if s['channels_last'] else ''}, "
        f"{s['quant'].upper()} at SQ ratio {s['ratio']:g}, PGD-{s['pgd_steps']}",
        f"machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs ({m['physical_cores']} physical cores), "
        f"torch {m['torch']}{', ' + m.get('cuda_device', '') if m.get('cuda_device') else ''}; "
        f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end",
        f"timing: {s['rounds']} round(s); per round both sides of a ratio run back to back, {s['steps']} timed "
        f"step(s) each after {s['warmup']} warm-up step(s); ratio = median over rounds of the ratio of medians; "
        f"{'CPU time of the process' if s['clock'] == 'process' else 'wall-clock'} seconds",
        "",
        f"{'ratio':<58} {'measured':>9} {'target':>8}  {'met':<4} {'numerator':>11} {'denominator':>11}  per round",
    ]
    for r in result["ratios"].values():
        if r.get("value") is None:
            lines.append(
                f"{r['title']:<58} {'-':>9} {r['target_op'] + ' ' + format(r['target'], '.2f'):>8}  "
                f"skip  {r.get('note', '')}"
            )
            continue
        rounds = ", ".join(f"{v:.3f}" for v in r["per_round"])
        lines.append(
            f"{r['title']:<58} {r['value']:9.3f} {r['target_op'] + ' ' + format(r['target'], '.2f'):>8}  "
            f"{'yes' if r['meets_target'] else 'NO':<4} {r['numerator_median_s']:10.4f}s {r['denominator_median_s']:10.4f}s"
            f"  [{rounds}]"
        )
    floor = result.get("esq_vs_madry_floor")
    if floor:
        lines += [
            "",
            f"ESQ / Madry floor from the arithmetic: 1 + t_loss_fwd_bwd / t_madry = {floor['floor']:.3f} "
            f"(one PGD step costs {floor['pgd_step_over_training_step']:.2f} x a training step); "
            f"measured / floor = {floor['measured_over_floor']:.3f}",
        ]
    mem = result.get("memory")
    if mem:
        lines += [
            "",
            "memory saved for backward by one ESQ loss graph (activations, parameters excluded):",
            f"  pairing=logits: {_mb(mem['logits']['saved_activation_bytes'])}; logits + {mem['paired_modules']} "
            f"residual modules: {_mb(mem['many']['saved_activation_bytes'])} (x{mem['ratio_many_over_logits']:.2f}); "
            f"extra {_mb(mem['extra_bytes'])} = {mem['extra_per_paired_output_byte']:.2f} x the paired outputs "
            f"({_mb(mem['many']['paired_output_bytes'])}; 1.00 = one extra tensor per paired module)",
        ]
        if "cuda_peak_ratio" in mem:
            lines.append(
                f"  CUDA peak of a whole step: logits {_mb(mem['logits']['cuda_peak_bytes'])}, "
                f"many {_mb(mem['many']['cuda_peak_bytes'])} (x{mem['cuda_peak_ratio']:.2f})"
            )
    d = result.get("diagnostics")
    if d:
        lines += [
            "",
            f"per step: SQ draw_selection {d['sq_draw_selection_ms']:.2f} ms over {d['quant_layers']} layers; "
            f"effective weights of all layers (once per forward) {d['effective_weights_all_layers_ms']:.2f} ms",
        ]
    busy = m.get("load_average_start")
    if busy and m.get("usable_cpus") and busy[0] > 0.5 * m["usable_cpus"]:
        lines += [
            "",
            f"note: load average {busy[0]} on {m['usable_cpus']} CPUs: other processes were running, "
            "so timings are noisy; compare ratios from a quiet machine",
        ]
    lines.append(f"\nJSON: {result['out']}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    s = settings_from(args)
    torch.set_num_threads(s.threads)
    want = wanted(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "smoke": bool(args.smoke),
        "settings": settings_dict(s),
        "machine": machine_info(s),
        "ratios": {},
        "out": str(args.out),
    }
    chosen = [r for r in RATIOS if r.key in want]
    skipped: dict[str, str] = {}
    if any(r.key == "pgd_vs_torchattacks" for r in chosen) and not torchattacks_available():
        skipped["pgd_vs_torchattacks"] = "torchattacks not installed: pip install torchattacks==3.5.1 --no-deps"
        chosen = [r for r in chosen if r.key != "pgd_vs_torchattacks"]
    start = time.perf_counter()
    if chosen:
        log(f"timing {len(chosen)} ratio(s) on {s.model}, batch {s.batch}, {s.device} ...")
        times, parts = time_pairs(s, chosen, build_variants(s, chosen), log)
        result["step_times_s"] = times
        result["madry_step_parts_s"] = parts
        for r in chosen:
            result["ratios"][r.key] = ratio_result(r, times[r.key])
    for r in RATIOS:
        if r.key in skipped:
            result["ratios"][r.key] = {
                "title": r.title,
                "value": None,
                "target": r.target,
                "target_op": ">=" if r.higher_is_better else "<=",
                "note": skipped[r.key],
            }
    floor = esq_madry_floor(result["ratios"], result.get("madry_step_parts_s", {}), s.pgd_steps)
    if floor:
        result["esq_vs_madry_floor"] = floor
    # Table order follows RATIOS whatever was skipped.
    result["ratios"] = {k: result["ratios"][k] for k in RATIO_KEYS if k in result["ratios"]}
    if "memory" in want:
        log("measuring memory ...")
        result["memory"] = memory_section(s)
    if "sq_overhead" in want:
        result["diagnostics"] = diagnostics(s)
    result["machine"]["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_report(result))
    return result


def main() -> None:
    run()


if __name__ == "__main__":
    main()
