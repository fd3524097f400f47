"""The run report, as `report.json` and `report.md`.

Per task, the declared metric (when there is one) and the held-out loss of the base model, the trained
MoE and the dense export; throughput; figures (with matplotlib: the per-task training loss and task
weights over the steps, and utilization heatmaps of the first, middle and last MoE layers); and a few
generations per task.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`, decoded without special tokens."""
    input_ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def write_report(report: dict, run_dir: Path) -> None:
    """Writes `report.json` and a human-readable `report.md` into the run directory."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# mtmoe report: {run_dir.name}",
        "",
        f"Base model `{report['base']}`; {report['train']['steps']} steps on {report['train']['world_size']} "
        f"process(es) in {report['train']['wall_s']:.0f} s ({report['train']['tokens_per_s']:.0f} tokens/s).",
        f"Dense export: `{report['export']['path']}` (expert merge weights: {report['export']['weights']}).",
        "",
    ]
    scored = {name: t for name, t in report["tasks"].items() if "metric" in t}
    if scored:
        lines += [
            "Each task's metric on greedy answers to its held-out prompts (higher is better):",
            "",
            "| task | metric | base | MoE | dense export | samples |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in scored.items():
            lines.append(
                f"| {name} | {t['metric']} | {t['base_score']:.1f} | {t['moe_score']:.1f} "
                f"| {t['dense_score']:.1f} | {t['samples']} |"
            )
        lines.append("")
    lines += [
        "Mean held-out token loss (lower is better):",
        "",
        "| task | base | MoE | dense export | held-out tokens |",
        "|---|---|---|---|---|",
    ]
    for name, t in report["tasks"].items():
        lines.append(
            f"| {name} | {t['base_loss']:.3f} | {t['moe_loss']:.3f} | {t['dense_loss']:.3f} | {t['tokens']} |"
        )
    if report.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in report["figures"]]
        lines.append("")
        lines.append("Every layer's heatmap is in `utilization/`; the numbers are in `utilization.json`.")
    lines += ["", "## Generations (greedy)", ""]
    for name, samples in report.get("generations", {}).items():
        lines.append(f"### {name}")
        for s in samples:
            lines += [
                "",
                "**Prompt:**",
                "```",
                s["prompt"].strip(),
                "```",
                f"**Reference:** {s['reference'].strip()!r}  ",
                f"**Base:** {s['base'].strip()!r}  ",
                *([f"**MoE:** {s['moe'].strip()!r}  "] if "moe" in s else []),
                f"**Dense export:** {s['dense'].strip()!r}",
            ]
        lines.append("")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
