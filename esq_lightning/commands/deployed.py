"""esq-eval ckpt_path=model.onnx: the robustness of the deployed model, measured in onnxruntime.

Clean accuracy in onnxruntime, and two attacks at the L_inf threat model (eval.eps):
- replay_<attack>: the white-box adversarial examples esq-export made on the source checkpoint (PyTorch, with
  gradients) replayed in onnxruntime. Every input where onnxruntime predicts otherwise than PyTorch did is listed.
- square: Square (score-based, margin loss) run against the onnxruntime session as a black box: it sees logits
  only, never the PyTorch model.
robust_acc.worst_case is the per-sample worst case over the two (an input counts only if it survives both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from esq_lightning.artifacts.results import build_results, print_results
from esq_lightning.atomic import atomic_write_json
from esq_lightning.commands.evaluate import load_test_split, run_config_with_eval
from esq_lightning.commands.onnx_export import (
    OnnxRuntimeClassifier,
    adversarial_path,
    load_adversarial,
    read_record,
    require_onnx,
    session,
)
from esq_lightning.errors import ESQUserError
from esq_lightning.evaluation.whitebox import attack_budget, attack_in_batches, predict
from esq_lightning.evaluation.worstcase import add_worst_case, worst_case

QUERY_ATTACK = "square"


def is_onnx_file(path: Any) -> bool:
    return str(path).lower().endswith(".onnx")


def evaluate_onnx(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Clean accuracy, the replayed white-box examples and Square, all in onnxruntime; results.json in `out`."""
    require_onnx("esq-eval ckpt_path=*.onnx")
    path = Path(str(cfg.ckpt_path))
    record = read_record(path)
    train_config = record["config"]
    run_cfg = run_config_with_eval(train_config, cfg)
    ev_cfg = run_cfg.eval
    adv_rec = record.get("adversarial")
    if not adv_rec:
        raise ESQUserError(
            f"ckpt_path: {path} was exported without adversarial examples (onnx.attack=null); "
            "export it again with onnx.attack=pgd20 to evaluate its robustness"
        )
    adv = load_adversarial(adversarial_path(path), adv_rec["sha256"])
    n = len(adv["y"]) if ev_cfg.n_samples is None else min(int(ev_cfg.n_samples), len(adv["y"]))
    x, y = load_test_split(run_cfg, int(train_config.get("seed", 0)), n)
    if not torch.equal(torch.from_numpy(adv["y"][:n]), y):
        raise ESQUserError(
            f"ckpt_path: the test inputs differ from those {path} was exported on (labels differ); "
            "use the export's data config"
        )
    batch_size = int(ev_cfg.batch_size)
    int8_fusion = bool(OmegaConf.select(ev_cfg, "onnx.int8_fusion", default=False))
    model = OnnxRuntimeClassifier(session(path, torch.get_num_threads(), int8_fusion=int8_fusion))
    clean_correct = predict(model, x, batch_size) == y
    # (a) the source checkpoint's white-box examples, replayed
    x_adv = torch.from_numpy(adv["x_adv"][:n])
    pred_adv = predict(model, x_adv, batch_size)
    torch_pred = torch.from_numpy(adv["torch_pred"][:n])
    differ = (pred_adv != torch_pred).nonzero().flatten().tolist()
    replay = f"replay_{adv_rec['attack']}"
    masks = {replay: clean_correct & (pred_adv == y)}
    records: dict[str, Any] = {
        replay: {
            "attack": replay,
            "kind": "budgeted",
            "norm": adv_rec["norm"],
            "eps": float(adv_rec["eps"]),
            "source": f"{adv_rec['attack']} on the source checkpoint in PyTorch (white-box), written by esq-export",
            "white_box_params": adv_rec["params"],
            "n_inputs": n,
            "same_predictions_as_torch": n - len(differ),
            "differences": [
                {"index": i, "label": int(y[i]), "torch_pred": int(torch_pred[i]), "onnx_pred": int(pred_adv[i])}
                for i in differ
            ],
            "torch_robust_acc": float(((torch_pred == y) & clean_correct).float().mean()) if n else None,
        }
    }
    # (b) Square against the session (logits only)
    params = OmegaConf.to_container(ev_cfg.get("params") or {}, resolve=True)
    eps, extra = attack_budget(QUERY_ATTACK, float(ev_cfg.eps), params.get(QUERY_ATTACK) or {})
    torch.manual_seed(int(cfg.seed))
    correct, _, used = attack_in_batches(
        QUERY_ATTACK, model, x, y, eps, extra, batch_size, progress=bool(cfg.get("progress", True)), seed=int(cfg.seed)
    )
    masks[QUERY_ATTACK] = correct & clean_correct
    records[QUERY_ATTACK] = {
        **used,
        "target": "the onnxruntime session (black box: logits only)",
        "queries_total": model.queries,
    }
    norm = str(ev_cfg.get("norm", "linf"))
    wc = worst_case(clean_correct, masks, records, norm, float(ev_cfg.eps))
    robust = add_worst_case({k: float(m.float().mean()) if n else float("nan") for k, m in masks.items()}, wc)
    ev = {
        "clean_acc": float(clean_correct.float().mean()) if n else float("nan"),
        "robust_acc": robust,
        "attacks": records,
        "n_samples": n,
        "worst_case": {k: v for k, v in wc.items() if k != "mask"},
    }
    deployment = {
        "runtime": "onnxruntime",
        "onnxruntime_version": record.get("onnxruntime_version"),
        "session": (
            "onnxruntime's default: QDQ fused into integer kernels where it can"
            if int8_fusion
            else "QuantizeLinear/DequantizeLinear as the ONNX spec defines them "
            "(session.disable_quant_qdq=1), the model esq-export checked"
        ),
        "file": str(path),
        "bytes": record.get("bytes"),
        "sha256": record.get("sha256"),
        "source": record.get("source"),
        "export_check": record.get("check"),
        "replay_prediction_differences": len(differ),
        "threat_model_note": (
            f"L_inf eps={float(ev_cfg.eps):g} on inputs in [0, 1]; replayed white-box "
            "examples (gradients of the PyTorch source) and a score-based black-box attack "
            "on the deployed file; worst case per input over both"
        ),
    }
    results = build_results(run_cfg, ev, checkpoint=str(path), run_dir=str(out), mode="onnx", deployment=deployment)
    atomic_write_json(out / "results.json", results)
    print_results(results)
    if differ:
        print(
            f"replay: onnxruntime predicts otherwise than PyTorch on {len(differ)} of {n} adversarial examples "
            f"(indices {differ[:10]}{' ...' if len(differ) > 10 else ''}; results.json attacks.{replay}.differences)",
            flush=True,
        )
    else:
        print(f"replay: onnxruntime gives PyTorch's prediction on all {n} adversarial examples", flush=True)
    return results
