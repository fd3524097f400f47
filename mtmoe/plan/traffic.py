"""Traffic per rank and step: the ZeRO gradient reduction and the expert-parallel all-to-alls."""

from __future__ import annotations

from typing import Any

from mtmoe.config import Config
from mtmoe.plan.probe import LayerSpec


def traffic_plan(
    cfg: Config, groups: list[dict[str, Any]], N: int, D: int, specs: list[LayerSpec]
) -> dict[str, Any]:
    """Bytes moved per rank and optimizer step.

    `payload` is the tensor bytes handed to the collective; `wire` is what a ring algorithm sends per
    rank: 2(P−1)/P of the payload for an all-reduce, (P−1)/P for a reduce-scatter, an all-gather, or the
    all-to-all share that leaves the rank under even routing.
    """
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    stage, accum, ep = cfg.parallel.zero_stage, cfg.train.grad_accum, cfg.parallel.ep_size
    out: dict[str, Any] = {"collectives": []}

    def add(name: str, payload: float, P: int, factor: float, times: int) -> None:
        share = (P - 1) / P if P > 1 else 0.0
        out["collectives"].append(
            {
                "what": name,
                "group": P,
                "times": times,
                "payload": payload * times,
                "wire": payload * times * share * factor,
            }
        )

    for expert in (False, True):
        gs = [g for g in groups if g["expert"] == expert]
        if not gs:
            continue
        P, numel = gs[0]["partitions"], sum(g["numel"] for g in gs)
        kind = "expert" if expert else "dense"
        if stage == 0:
            add(f"all-reduce {kind} grads", numel * b, P, 2, 1)
        else:
            add(f"reduce-scatter {kind} grads", numel * b, P, 1, accum if stage == 2 else 1)
            add(f"all-gather {kind} params", numel * b, P, 1, 1)
    if ep > 1:
        passes = 3 if cfg.model.gradient_checkpointing else 2  # forward, backward, recomputed forward
        for spec in specs:
            if not spec.moe:
                continue
            F = spec.ffn
            sent, back = (D, D) if spec.native else (D + 2 * F, F + D)
            add("all-to-all rows out", N * sent * b, ep, 1, accum * passes)
            add("all-to-all rows back", N * back * b, ep, 1, accum * passes)
    merged: dict[str, dict[str, Any]] = {}
    for c in out["collectives"]:
        m = merged.setdefault(c["what"], {**c, "payload": 0.0, "wire": 0.0, "times": 0})
        m["payload"] += c["payload"]
        m["wire"] += c["wire"]
        m["times"] += c["times"]
    out["collectives"] = list(merged.values())
    out["payload"] = sum(c["payload"] for c in out["collectives"])
    out["wire"] = sum(c["wire"] for c in out["collectives"])
    return out
