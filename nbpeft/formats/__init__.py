"""Adapters out: the PEFT folder, merged checkpoints, GGUF, and what each serving program takes."""
