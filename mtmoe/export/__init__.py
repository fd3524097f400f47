"""Turning a trained MoE-LoRA run into a dense Hugging Face model."""
