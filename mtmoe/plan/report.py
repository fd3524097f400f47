"""A plan as text for `launch/plan.py`."""

from __future__ import annotations

from typing import Any

from mtmoe.plan.workload import GIB


def _unit(nbytes: float) -> tuple[str, float]:
    return ("GiB", GIB) if nbytes >= GIB else ("MiB", 2**20)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def _formula(coef: list[float], terms: list[str]) -> str:
    """`c₀ + c₁T + …` with the zero terms left out, e.g. `8 TF + 6 TD + 612 T − 188`."""
    parts = [(round(c), t) for c, t in zip(coef, terms, strict=True) if round(c)]
    parts.sort(key=lambda p: -len(p[1]) if p[1] != "1" else 1)
    text = " ".join(f"{'-' if c < 0 else '+'} {abs(c)}{'' if t == '1' else ' ' + t}" for c, t in parts)
    return text.removeprefix("+ ") or "0"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a readable table (GiB per rank; MiB for plans under 1 GiB)."""
    r, w, m, mem = p["recipe"], p["workload"], p["model"], p["memory"]
    unit, scale = _unit(mem["peak"])

    def _gib(n: float) -> str:
        return f"{n / scale:.3f}"

    acts, opt, params = p["activations"], p["optimizer"], p["parameters"]
    ep, world, dt = r["ep_size"], w["world"], "bf16" if r["dtype"] == "bfloat16" else "fp32"
    gc = r["gradient_checkpointing"]
    lines = [
        f"model: {m['architecture']} ({r['base']}), {m['layers']} layers, {m['moe_layers']} of them MoE, "
        f"hidden {m['hidden']}, vocab {m['vocab']}; {r['family']} experts: {m['experts']} per block, "
        f"{m['experts_per_rank']} per rank",
        f"run: world {world}, ep_size {ep} (expert-data-parallel {world // ep}), ZeRO-{r['zero_stage']}, "
        f"{r['dtype']}, micro-batch {acts['micro_batch']} × {acts['seq_len']} tokens"
        f"{' with padding' if w['padded'] else ''}, grad_accum {r['grad_accum']}, gradient checkpointing "
        f"{'on' if gc else 'off'}",
        "",
        f"{'per rank':<44}{'elements':>11}{unit:>10}",
    ]

    def row(name: str, nbytes: float, numel: float | None = None) -> None:
        lines.append(f"  {name:<42}{_count(numel) if numel is not None else '':>11}{_gib(nbytes):>10}")

    for key, name in (
        ("frozen_dense", f"frozen, {dt}"),
        ("frozen_expert", f"frozen experts, {dt}"),
        ("trainable_dense", f"trainable: routers, attn LoRA, {dt}"),
        ("trainable_expert", f"trainable: expert LoRA, {dt}"),
    ):
        if params[key]["numel"]:
            row(name, params[key]["bytes"], params[key]["numel"])
    if r["zero_stage"] == 3:
        row(f"frozen kept, ZeRO-3 (1/{world}; experts 1/{world // ep})", mem["frozen_held"])
        row("ZeRO-3: gathered at once (transient)", mem["zero3_gathered"])
    row("buffers", params["buffers"]["bytes"], params["buffers"]["numel"])
    share = f" (1/{world} dense, 1/{world // ep} expert)" if r["zero_stage"] else ""
    if opt["master"]:
        row(f"fp32 master{share}", opt["master"])
    row(f"AdamW moments, fp32{share}", opt["adam"])
    if p["quality_retain"]:
        row("Quality Retaining EMA + teachers, fp32", p["quality_retain"])
    row(f"gradients, {dt}" + (" (own partition)" if r["zero_stage"] >= 2 else ""), opt["grads"])
    if opt["bucket"]:
        row("ZeRO reduce bucket (backward)", opt["bucket"])
    row("activations, no checkpointing" + ("" if gc else " *"), acts["no_checkpointing"])
    row("activations, checkpointing" + (" *" if gc else ""), acts["checkpointing"]["total"])
    row("LM-head logits, one chunk (transient)", acts["workspace"])
    if opt["step_grads_fp32"] or opt["step_workspace"]:
        row("step: fp32 grads, AdamW temporaries", opt["step_grads_fp32"] + opt["step_workspace"])
    lines.append(f"  {'-' * 63}")
    row("persistent: parameters, optimizer state", mem["persistent"])
    row("+ the larger of backward and step", max(mem["backward_phase"], mem["step_phase"]))
    row("planned peak", mem["peak"])
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines += [
        f"  {verdict} in {w['gpu_mem_gib']:g} GiB: {mem['usable'] / GIB:.1f} GiB usable "
        f"({w['reserve_gib']:g} GiB kept for the CUDA context and NCCL, {w['frag']:.0%} for fragmentation)",
        "  * = the activations counted in the peak",
    ]
    fits = acts["block_fits"]
    what = "router" if fits["router_only"] else "MoE block"
    for key in ("no_input_grad", "input_grad"):
        if key in fits:
            formula = _formula(fits[key]["coef"], fits["terms"])
            lines.append(f"  {what} saved bytes, fitted on real blocks ({key.replace('_', ' ')}): {formula}")
    layer = max(acts["layers"], key=lambda parts: sum(parts.values()))
    lines += [
        "",
        f"largest layer's saved activations, {unit}: "
        + ", ".join(f"{k} {_gib(v)}" for k, v in layer.items()),
    ]
    t = p["traffic"]
    lines += ["", f"{'traffic per rank and step':<44}{'payload ' + unit:>11}{'wire ' + unit:>10}"]
    for c in t["collectives"]:
        what = f"{c['what']} (group {c['group']}, ×{c['times']})"
        lines.append(f"  {what:<42}{_gib(c['payload']):>11}{_gib(c['wire']):>10}")
    lines.append(f"  {'total':<42}{_gib(t['payload']):>11}{_gib(t['wire']):>10}")
    if "measured" in p:
        planned, measured = p["measured"]["planned"], p["measured"]["measured"]
        title = "checked here: world 1, ZeRO-0, one step"
        lines += ["", f"{title:<44}{'planned':>11}{'measured':>10}{'ratio':>7}"]
        for k in ("frozen", "trainable", "grads", "optimizer", "activations", "total"):
            ratio = planned[k] / measured[k]
            lines.append(f"  {k:<42}{_gib(planned[k]):>11}{_gib(measured[k]):>10}{ratio:7.3f}")
        lines.append(f"  {'peak RSS growth (for information)':<42}{'':>11}{_gib(measured['rss_growth']):>10}")
    return "\n".join(lines)
