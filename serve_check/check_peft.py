"""The reference implementation (peft) loads nbpeft's adapter folder and gives nbpeft's logits.

Run with an environment that has peft:  python check_peft.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(out: Path) -> None:
    reference = torch.load(out / "reference.pt")
    base = AutoModelForCausalLM.from_pretrained((out / "base_path.txt").read_text().strip(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "lora")).eval()
    worst, same = 0.0, 0
    for prompt, want, logits in zip(reference["prompts"], reference["tokens"], reference["logits"]):
        with torch.no_grad():
            got = model(torch.tensor([prompt + want])).logits[0]
            tokens = model.generate(torch.tensor([prompt]), max_new_tokens=len(want), min_new_tokens=len(want), do_sample=False)
        same += tokens[0, len(prompt):].tolist() == want
        worst = max(worst, (got - logits).abs().max().item())
    print(f"peft: same greedy tokens on {same}/{len(reference['prompts'])} prompts; largest |logit difference| {worst:.2e}")
    (out / "peft_results.json").write_text(json.dumps({"same_greedy_tokens": same, "max_abs_logit_diff": worst}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
