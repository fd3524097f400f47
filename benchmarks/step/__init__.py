"""One training step of the demo model, measured in four modes (`python -m benchmarks.step MODE`).

    compare   mtmoe against PEFT LoRA, a per-expert loop, the full-vocabulary head and the frozen floor
    mfu       a CPU stand-in for MFU: the step's counted FLOP/s over a large matmul's
    packing   packed against padded micro-batches of the demo data
    gpu       issue #8's GPU run, prepared: mtmoe, PEFT and the floor with MFU on random-weight Llamas

`common` holds what the modes share: the batch, the variants' losses, the floor and the step itself.
"""
