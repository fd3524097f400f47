"""Fold a trained MoE-LoRA run into a dense Hugging Face model of the base architecture.

    python launch/export.py --run runs/demo --out runs/demo/dense [--weights utilization|uniform]

Each FFN becomes base + sum_e u_e ΔW_e (ΔW_e = B_e·A_e, u_e the expert's share of gate mass on the
held-out set); attention LoRA is folded exactly. The output loads with plain transformers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtmoe.runtime import configure_process, set_torch_threads  # noqa: E402

configure_process()


def main(argv: list[str] | None = None) -> Path:
    """Exports and returns the output folder."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="the run directory (train.output_dir)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the HF folder")
    parser.add_argument("--weights", default="utilization", help="expert merge weights: utilization|uniform")
    args = parser.parse_args(argv)

    from mtmoe.export.dense import fold_to_dense, save_dense
    from mtmoe.export.run import load_trained_model, merge_shares

    set_torch_threads()
    shares = merge_shares(args.run, args.weights)
    cfg, model, tokenizer = load_trained_model(args.run)
    lm = fold_to_dense(model, shares)
    save_dense(lm, tokenizer, args.out)
    info = {"run": str(args.run), "weights": args.weights, "base": cfg.model.base}
    (args.out / "mtmoe_export.json").write_text(json.dumps(info, indent=1))
    print(f"[mtmoe] exported a dense {type(lm).__name__} to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
