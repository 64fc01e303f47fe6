"""nbpeft.combine against the reference's add_weighted_adapter: the mixed adapter's logits.

A tiny random Llama gets two reference LoRA adapters with random non-zero A and B (rank 4 on
q/k/v/o, alpha 8 and alpha 16; B drawn at random after the default initialisation), saved to a temporary folder and
loaded into nbpeft on an identical copy of the base model. For each combination both sides
mix the same adapters with weights 0.7 and -0.3 (density 0.5 where it applies) and the
script prints the largest absolute logit difference, beside how far the mix moves the
logits from the base model's (so a zero difference is not a mix that does nothing).

DARE draws a random mask. Both sides draw from torch's global generator in the same order
(the new adapter's initialisation, then per layer A then B, adapter by adapter), so seeding
it the same way before each call makes the draws identical: the dare rows compare the same
masks, not density=1.

    PYTHONPATH=$PWD /work/main/.venv-bench/bin/python benchmarks/combine_parity.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbpeft  # noqa: E402

# (label, nbpeft.combine keywords, the reference's add_weighted_adapter keywords)
CASES = [
    ("linear", {"how": "linear"}, {"combination_type": "linear"}),
    ("cat", {"how": "cat"}, {"combination_type": "cat"}),
    ("svd", {"how": "svd"}, {"combination_type": "svd"}),
    ("svd rank=2", {"how": "svd", "rank": 2}, {"combination_type": "svd", "svd_rank": 2}),
    ("ties", {"how": "ties", "density": 0.5}, {"combination_type": "ties", "density": 0.5}),
    ("ties frequency", {"how": "ties", "density": 0.5, "majority_sign_method": "frequency"},
     {"combination_type": "ties", "density": 0.5, "majority_sign_method": "frequency"}),
    ("dare_linear", {"how": "dare_linear", "density": 0.5}, {"combination_type": "dare_linear", "density": 0.5}),
    ("dare_ties", {"how": "dare_ties", "density": 0.5}, {"combination_type": "dare_ties", "density": 0.5}),
]
WEIGHTS = {"a": 0.7, "b": -0.3}
SEED = 1234


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def main() -> None:
    import peft

    warnings.filterwarnings("ignore")
    base = tiny_llama()
    ours = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(1)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="a")
    ref.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    # B starts at zero: give it random values, keeping init_lora_weights at its default, which the
    # reference copies into the mixed adapter's config (a random-B init would draw more random numbers)
    with torch.no_grad():
        for key, param in ref.named_parameters():
            if "lora_B" in key:
                param.normal_(std=0.1)
    ref.eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder, selected_adapters=["a", "b"])
        # the reference writes adapter "a" in a subfolder too; nbpeft reads each folder by name
        for n in ("a", "b"):
            nbpeft.load_adapter(ours, Path(folder) / n, name=n)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        for n in ("a", "b"):
            ref.set_adapter(n)
            nbpeft.set_adapter(ours, n)
            diff = (ref(ids).logits - ours(ids).logits).abs().max().item()
            print(f"adapter {n} as loaded: max |logit diff| {diff:.2e}")
        print(f"\n{'how':<16} {'max |logit diff|':>17} {'max |logit change| vs base':>27}")
        with ref.disable_adapter():
            base_logits = ref(ids).logits
        for i, (label, options, ref_options) in enumerate(CASES):
            name = f"mix{i}"
            torch.manual_seed(SEED)
            ref.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), name, **ref_options)
            torch.manual_seed(SEED)
            nbpeft.combine(ours, WEIGHTS, name=name, **options)
            ref.set_adapter(name)
            nbpeft.set_adapter(ours, name)
            ref_logits = ref(ids).logits
            diff = (ref_logits - ours(ids).logits).abs().max().item()
            change = (ref_logits - base_logits).abs().max().item()
            print(f"{label:<16} {diff:>17.2e} {change:>27.2e}")


if __name__ == "__main__":
    main()
