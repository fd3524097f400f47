"""Write a run's checkpoint as one consolidated fp32 state dict of the whole MoE model.

    python launch/consolidate.py --run runs/demo [--tag step_000040] --out runs/demo/moe_fp32.safetensors

The file holds every tensor of the MoE-LoRA model (the frozen base plus the trained LoRA experts,
routers and attention LoRA) in fp32, with every block's experts in global order, whatever world size
and `ep_size` trained it. `MoELM.load_state_dict` takes it directly (strict). This is what DeepSpeed's
`zero_to_fp32.py` does for dense models and cannot do for MoE checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtmoe.runtime import configure_process, set_torch_threads

configure_process()


def main(argv: list[str] | None = None) -> Path:
    """Writes the consolidated file and returns its path."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="the run directory (train.output_dir)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from mtmoe.export.run import load_trained_model

    set_torch_threads()
    _, model, _ = load_trained_model(args.run, args.tag)
    # clone(): tied tensors (embeddings and LM head) must be separate entries in safetensors.
    state = {k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out, metadata={"format": "pt", "run": str(args.run)})
    print(f"[mtmoe] wrote {len(state)} fp32 tensors to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
