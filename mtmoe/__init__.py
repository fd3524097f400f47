"""mtmoe: multitask fine-tuning of LLMs with a Mixture of LoRA experts on DeepSpeed."""

__version__ = "0.1.0"
