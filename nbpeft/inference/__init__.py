"""Using a trained adapter: generation, and several adapters answering the same prompts."""
