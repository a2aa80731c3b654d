"""The GPU check: what no CPU run can show, in one command that needs no internet (benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check            # on a GPU: WRN-28-10 and ResNet-152, 3x32x32, batch 128 (< 8 min)
    python -m benchmarks.gpu_check --cpu      # tiny shapes on CPU (the test suite runs this)

It prints, for WRN-28-10 and ResNet-152 (BWN at SQ ratio 0.6, PGD-10 training attack, random CIFAR-shaped data):
1. the ESQ and Madry step throughput (images/s) and the peak GPU memory of each, under float32, bf16 autocast,
   bf16 + channels_last, and bf16 + channels_last + torch.compile;
2. the ESQ/Madry time ratio against its arithmetic floor 1 + t_loss / t_madry (ESQ = Madry + one clean
   forward/backward; docs/performance.md);
3. whether bf16 and float32 logits agree within the stated tolerance (eval mode, full quantization);
4. one 2-process DDP training step (NCCL on 2 GPUs; gloo with both processes on the one GPU otherwise) and
   whether both ranks end with identical weights.
The timed steps are benchmarks.cases.HandLoop (the same arithmetic as ESQModule.training_step). Medians over the
timed steps after warm-up; the JSON of every number goes to --out. Exit code 1 when a check fails
(bf16 tolerance, DDP weights), 0 otherwise; throughput is reported, not judged.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import Settings, build_base_model, machine_info, median, preloaded_batches, quantized_copy

# bf16 vs float32 logits (same weights, same inputs, eval mode at full quantization): the relative L2 error
# ||z_bf16 - z_fp32|| / ||z_fp32|| must stay below this. bf16 keeps 8 bits of mantissa (relative rounding
# 2^-9 = 0.2% per operation); 5% leaves room for the rounding of a 150-layer network, not for a wrong result.
BF16_REL_TOL = 0.05
VARIANTS = (  # name, precision, channels_last, compile
    ("float32", "32", False, False),
    ("bf16", "bf16", False, False),
    ("bf16+channels_last", "bf16", True, False),
    ("bf16+channels_last+compile", "bf16", True, True),
)
GPU = {
    "models": ("wrn28_10", "resnet152"),
    "batch": 128,
    "image_size": 32,
    "steps": 5,
    "warmup": 2,
    "pgd_steps": 10,
    "compile_backend": "inductor",
    "ddp_model": "resnet20",
}
# Tiny versions of the same architectures (WideResNet 10-1, bottleneck ResNet [1,1,1,1] of width 8) on 16x16
# inputs: every code path of the GPU run (autocast, channels_last, dynamo tracing, DDP) in seconds on a CPU.
CPU = {
    "models": ("wrn28_10", "resnet152"),
    "batch": 4,
    "image_size": 16,
    "steps": 2,
    "warmup": 1,
    "pgd_steps": 2,
    "compile_backend": "eager",
    "ddp_model": "resnet20",
}
TINY_KWARGS = {"wrn28_10": {"depth": 10, "widen_factor": 1}, "resnet152": {"num_blocks": (1, 1, 1, 1), "width": 8}}
NUM_CLASSES = {"wrn28_10": 10, "resnet152": 100}
DDP_TIMEOUT_S = 240


def log(msg: str) -> None:
    print(msg, flush=True)


def build(s: Settings, tiny: bool) -> nn.Module:
    """The seeded full-precision architecture of `s.model` (tiny on CPU)."""
    if not tiny:
        return build_base_model(s)
    from benchmarks.common import prepare_model
    from esq_lightning.models import MODELS, BottleneckResNet, WideResNet

    classes = {"wrn28_10": WideResNet, "resnet152": BottleneckResNet}
    torch.manual_seed(s.seed)
    make = classes.get(s.model, MODELS[s.model])
    model = make(num_classes=s.num_classes, in_channels=s.in_channels, **TINY_KWARGS.get(s.model, {}))
    return prepare_model(model, s)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def time_variant(base: nn.Module, s: Settings, compile_backend: str | None) -> dict[str, Any]:
    """ESQ and Madry steps on one quantized copy (compiled once, when asked): throughput, peak memory, floor."""
    from benchmarks.cases import HandLoop

    device = torch.device(s.device)
    model = quantized_copy(base, s)
    if compile_backend:
        from esq_lightning.commands.train import compile_model

        model = compile_model(model, ["logits"], backend=compile_backend)
    batches = preloaded_batches(s, s.warmup + s.steps + 1)
    out: dict[str, Any] = {}
    for method in ("adversarial", "esq"):
        loop = HandLoop(model, method, s, time_attack=method == "adversarial")
        peak_reset(device)
        t0 = time.perf_counter()
        durations = loop.run(batches, s.warmup + s.steps)[s.warmup :]
        step = median(durations)
        key = "madry" if method == "adversarial" else "esq"
        out[key] = {
            "step_s": step,
            "images_per_s": s.batch / step,
            "peak_mb": peak_mb(device),
            "wall_s": time.perf_counter() - t0,
        }
        if method == "adversarial":
            out["madry_loss_fwd_bwd_s"] = median(loop.loss_times[s.warmup :])
    out["esq_over_madry"] = out["esq"]["step_s"] / out["madry"]["step_s"]
    out["floor"] = 1 + out["madry_loss_fwd_bwd_s"] / out["madry"]["step_s"]
    out["over_floor"] = out["esq_over_madry"] / out["floor"]
    return out


def bf16_agreement(base: nn.Module, s: Settings) -> dict[str, Any]:
    """float32 vs bf16-autocast logits of the quantized model on one batch (eval mode, full quantization)."""
    from esq_lightning.quant import full_quantization

    model = quantized_copy(base, s).eval()
    x, _ = preloaded_batches(s, 1)[0]
    with torch.no_grad(), full_quantization(model):
        z32 = model(x).float()
        with torch.autocast(device_type=torch.device(s.device).type, dtype=torch.bfloat16):
            z16 = model(x).float()
    rel = ((z16 - z32).norm() / z32.norm().clamp_min(1e-12)).item()
    return {
        "rel_l2_error": rel,
        "max_abs_diff": (z16 - z32).abs().max().item(),
        "top1_agreement": (z16.argmax(1) == z32.argmax(1)).float().mean().item(),
        "tolerance": BF16_REL_TOL,
        "agree": rel <= BF16_REL_TOL,
    }


# ---- DDP --------------------------------------------------------------------------------------------------------
class _Step(nn.Module):
    """One ESQ loss as DDP sees it: one forward of the wrapper (the attack and both passes inside), one backward,
    as Lightning's DDP runs training_step."""

    def __init__(self, model: nn.Module, s: Settings) -> None:
        super().__init__()
        from benchmarks.cases import train_attack
        from esq_lightning.training.objectives import Objective

        self.model, self.objective, self.attack = model, Objective("esq"), train_attack(s)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        attack = functools.partial(self.attack, self.model, generator=generator)
        return self.objective(self.model, x, y, attack).loss


def _ddp_worker(rank: int, world: int, backend: str, init: str, s: Settings, tiny: bool, result_file: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks.cases import sgd_factory
    from esq_lightning.quant import draw_selection, sq_generator
    from esq_lightning.rng import Stream, step_generator

    torch.set_num_threads(1)
    # A rendezvous or collective that cannot complete fails after 2 minutes instead of hanging.
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    ddp = None
    try:
        n_gpu = torch.cuda.device_count() if s.device == "cuda" else 0
        device = torch.device(f"cuda:{rank % n_gpu}") if n_gpu else torch.device("cpu")
        if n_gpu:
            torch.cuda.set_device(device)
        s = replace(s, device=str(device))
        model = quantized_copy(build(s, tiny), s)
        step = _Step(model, s)
        ddp = DDP(step, device_ids=[device.index] if device.type == "cuda" and backend == "nccl" else None)
        opt = sgd_factory()(params=model.parameters())
        x, y = preloaded_batches(s, world)[rank]  # each rank its own shard
        draw_selection(model, sq_generator(s.seed, 0))  # the same SQ draw on every rank
        t0 = time.perf_counter()
        loss = ddp(x, y, step_generator(s.seed, 0, Stream.ATTACK))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        if backend == "gloo":
            flat = flat.cpu()
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            diff = max((g - gathered[0]).abs().max().item() for g in gathered[1:])
            Path(result_file).write_text(
                json.dumps({"max_param_diff": diff, "loss": loss.item(), "step_s": seconds, "device": str(device)})
            )
        dist.barrier()
    finally:
        # The DDP wrapper (its reducer holds the process group) goes first: freed after destroy_process_group, one
        # rank's teardown hung in about one run of three on a 2-core CPU (gloo), after the step had finished.
        del ddp
        gc.collect()
        dist.destroy_process_group()


def ddp_check(s: Settings, tiny: bool) -> dict[str, Any]:
    import torch.multiprocessing as mp

    n_gpu = torch.cuda.device_count() if s.device == "cuda" else 0
    backend = "nccl" if n_gpu >= 2 else "gloo"
    where = f"{backend}, 2 GPUs" if n_gpu >= 2 else "gloo, both processes on the one GPU" if n_gpu == 1 else "gloo, CPU"
    # One node: gloo talks over the loopback interface (a host name that resolves to an unreachable address, common
    # on machines without a network, would stall its connect).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        init, result = f"file://{tmp}/rendezvous", f"{tmp}/result.json"
        t0 = time.perf_counter()
        ctx = mp.spawn(_ddp_worker, args=(2, backend, init, s, tiny, result), nprocs=2, join=False)
        while not ctx.join(timeout=5):
            if time.perf_counter() - t0 > DDP_TIMEOUT_S:
                for proc in ctx.processes:
                    proc.terminate()
                raise TimeoutError(f"the 2-process DDP step did not finish in {DDP_TIMEOUT_S} s")
        out = json.loads(Path(result).read_text())
    out.update(where=where, wall_s=time.perf_counter() - t0, identical=out["max_param_diff"] == 0.0)
    return out


# ---- the run ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (what the test suite runs)")
    p.add_argument("--models", nargs="+", default=None, help="default: wrn28_10 resnet152")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (after warm-up)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-ddp", action="store_true")
    p.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds: variants that would start after this are skipped (the whole check stays < 8 min)",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check.json"))
    return p.parse_args(argv)


def _fmt_mem(mb: float | None) -> str:
    return f"{mb:9.0f} MB" if mb is not None else "        -  "


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = CPU if args.cpu else GPU
    if not args.cpu and not torch.cuda.is_available():
        log("no CUDA device: run with --cpu for the tiny CPU form, or on a machine with a GPU")
        return 2
    device = "cpu" if args.cpu else "cuda"
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = device == "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (TF32 would change the numbers)
        torch.backends.cudnn.allow_tf32 = False
    base_s = Settings(
        device=device,
        batch=args.batch or cfg["batch"],
        image_size=cfg["image_size"],
        steps=args.steps or cfg["steps"],
        warmup=cfg["warmup"],
        pgd_steps=cfg["pgd_steps"],
        rounds=1,
    )
    info = machine_info(base_s)
    log(
        f"esq-lightning GPU check ({'CPU form, tiny shapes' if args.cpu else 'GPU'}): "
        f"{info.get('cuda_device') or info['cpu_model']}, torch {info['torch']}, CUDA {info.get('cuda', '-')}"
    )
    log(
        f"BWN at SQ ratio {base_s.ratio}, PGD-{base_s.pgd_steps} training attack, batch {base_s.batch}, "
        f"3x{base_s.image_size}x{base_s.image_size} random data; {base_s.steps} timed steps after {base_s.warmup} "
        f"warm-up, medians; TF32 off\n"
    )
    result: dict[str, Any] = {"machine": info, "settings": {**cfg, "batch": base_s.batch}, "models": {}}
    failures = []
    header = (
        f"{'model':<10} {'variant':<27} {'ESQ img/s':>10} {'Madry img/s':>12} {'ESQ peak':>12} "
        f"{'Madry peak':>12} {'ESQ/Madry':>10} {'floor':>7}"
    )

    def save() -> None:
        # After every section, so a run stopped by the 8-minute limit still leaves what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "failures": failures}, indent=2) + "\n")

    def variant(name: str, base: nn.Module, s0: Settings, label: str, precision: str, cl: bool, comp: bool) -> None:
        rows = result["models"].setdefault(name, {})
        if time.perf_counter() - start > args.budget:
            log(f"{name:<10} {label:<27} skipped: past the {args.budget:.0f} s budget")
            rows[label] = {"skipped": "budget"}
            return
        s = replace(s0, precision=precision, channels_last=cl)
        b = base.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        try:
            r = time_variant(b, s, cfg["compile_backend"] if comp else None)
        except Exception as exc:  # one failing variant (e.g. compile) must not hide the others
            log(f"{name:<10} {label:<27} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"}
            failures.append(f"{name} {label}")
            return
        rows[label] = r
        log(
            f"{name:<10} {label:<27} {r['esq']['images_per_s']:10.1f} {r['madry']['images_per_s']:12.1f} "
            f"{_fmt_mem(r['esq']['peak_mb'])} {_fmt_mem(r['madry']['peak_mb'])} {r['esq_over_madry']:10.3f} "
            f"{r['floor']:7.3f}"
        )
        save()

    log(header)
    models = {}
    for name in args.models or cfg["models"]:
        s0 = replace(base_s, model=name, num_classes=NUM_CLASSES.get(name, 10))
        base = build(s0, args.cpu)
        models[name] = (base, s0)
        for label, precision, cl, comp in VARIANTS:
            if not comp:
                variant(name, base, s0, label, precision, cl, comp)
        agree = bf16_agreement(base.to(memory_format=torch.contiguous_format), s0)
        result["models"][name]["bf16_vs_float32"] = agree
        log(
            f"{name:<10} bf16 vs float32 logits: relative L2 error {agree['rel_l2_error']:.4f} (tolerance "
            f"{BF16_REL_TOL}), top-1 agreement {agree['top1_agreement']:.3f}: "
            f"{'agree' if agree['agree'] else 'DO NOT AGREE'}"
        )
        if not agree["agree"]:
            failures.append(f"{name} bf16 vs float32")
        save()
    if not args.no_ddp:
        s = replace(base_s, model=cfg["ddp_model"], batch=max(2, base_s.batch // 4))
        try:
            d = ddp_check(s, args.cpu)
            result["ddp"] = d
            log(
                f"DDP: 2 processes ({d['where']}), one ESQ step of {s.model} (batch {s.batch} per process) in "
                f"{d['step_s']:.2f} s, loss {d['loss']:.4f}; weights identical on both ranks: "
                f"{'yes' if d['identical'] else 'NO'} (max difference {d['max_param_diff']:.3g})"
            )
            if not d["identical"]:
                failures.append("DDP weights differ across ranks")
        except Exception as exc:
            result["ddp"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"DDP: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            failures.append("DDP step")
        save()
    # torch.compile last: its compile time is the least predictable part, and the budget skips what does not fit.
    if not args.no_compile:
        log(f"\n{header}")
        for name, (base, s0) in models.items():
            for label, precision, cl, comp in VARIANTS:
                if comp:
                    variant(name, base, s0, label, precision, cl, comp)
    log(
        "\nESQ/Madry: the error-silenced step over Madry's; floor = 1 + (Madry's loss forward/backward) / (Madry "
        "step), the ratio the extra clean pass alone implies (measured/floor ~ 1: no overhead beyond the arithmetic). "
        "Peak: torch.cuda.max_memory_allocated over the steps."
    )
    result["seconds"] = time.perf_counter() - start
    save()
    log(
        f"\n{'all checks passed' if not failures else 'FAILED: ' + '; '.join(failures)} in {result['seconds']:.0f} s;"
        f" JSON: {args.out}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(run())
