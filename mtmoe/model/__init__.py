"""Model pieces: base loading, router, dispatch, experts, the MoE-LoRA block and its injection."""
