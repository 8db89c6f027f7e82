"""What the terminal says about a finished run: its accuracies, and what happened when distillation lost accuracy."""

from __future__ import annotations

from typing import Any


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The result lines of a run: accuracies, and what happened when distillation lost accuracy.

    When the final student is worse than the calibrated one (its starting point), a second line
    says by how much, at which budget, and whether the data-free signal (teacher–student
    agreement on held-out synthetic images, measured without test data) saw it coming.
    """
    ptq, final = float(metrics["ptq_top1"]), float(metrics["quant_top1"])
    head = f"FP top-1 {metrics['fp_top1']:.2f}% | {metrics['method']} W{metrics['w_bits']}A{metrics['a_bits']}: "
    from intraq_core.quant import format_quant_map
    from intraq_core.quant.sensitivity import format_sensitivity

    qmap = metrics.get("quantization")
    mapped = [f"quantized: {format_quant_map(qmap, layers=False)}"] if qmap else []
    ranked = (metrics.get("training") or {}).get("activation_sensitivity")
    if ranked:  # where the bits hurt: each activation tensor alone, on synthetic images
        mapped.append(f"most costly activation tensors alone: {format_sensitivity(ranked)}")
    if metrics.get("epochs") == 0:
        return [head + f"{final:.2f}% (no distillation)", *mapped]
    lines = [head + f"calibrated {ptq:.2f}% → distilled {final:.2f}%", *mapped]
    training = metrics.get("training") or {}
    if training.get("kept_final") is False:
        chosen = training.get("selected_epoch")
        where = "the starting (calibrated) student" if chosen is None else f"the student after epoch {chosen + 1}"
        evals = training.get("evaluations") or []
        kept = next((e for e in evals if e.get("epoch") == chosen), None)
        scores = ""
        if kept is not None and evals:
            scores = f" (held-out synthetic KL {kept['kl']:.4f}, the final one's {evals[-1]['kl']:.4f})"
        lines.append(
            f"guard: the final student was worse by the data-free signals; kept {where}{scores}; "
            "distill.select=final keeps the last one"
        )
    if final >= ptq:
        return lines
    iterations = metrics.get("gen_iterations")
    budget = f"{metrics.get('num_images', '?')} synthetic images"
    budget += f" × {iterations} iterations" if iterations else " (not optimized)"
    budget += f", {metrics.get('epochs', '?')} epoch(s)"
    training = metrics.get("training") or {}
    before = (training.get("holdout_agreement_calibrated") or {}).get("agreement")
    after = (training.get("holdout_agreement_final") or {}).get("agreement")
    if before is None or after is None:
        signal = "no held-out synthetic images to check it without test data (distill.holdout_fraction=0)"
    elif after < before:
        signal = f"the data-free signal saw it: held-out teacher agreement fell {before:.1f}% → {after:.1f}%"
    else:
        signal = (
            f"the data-free signal did not: held-out teacher agreement went {before:.1f}% → {after:.1f}% "
            "(the synthetic images do not represent the test set well)"
        )
    lines.append(
        f"note: the final model is {ptq - final:.2f} points WORSE than its starting point (calibrated) at this "
        f"budget ({budget}); {signal}. A small budget such as the smoke config's is expected to lose accuracy."
    )
    return lines
