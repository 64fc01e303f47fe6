"""vLLM's CPU build serves nbpeft's LoRA folder and merged folder with nbpeft's greedy tokens.

Run with serve_check/.venv-vllm:  python check_vllm.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest


def greedy(llm: LLM, prompts: list[list[int]], steps: int, lora: LoRARequest | None = None) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=steps, min_tokens=steps, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora)
    return [list(o.outputs[0].token_ids) for o in outputs]


def main(out: Path, which: str) -> None:
    reference = torch.load(out / "reference.pt")
    steps = len(reference["tokens"][0])
    base = (out / "base_path.txt").read_text().strip()
    # On the CPU backend this fraction of host memory is reserved for the KV cache: keep it small on a shared machine.
    common = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0, gpu_memory_utilization=0.1)
    if which == "lora":
        llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=1, **common)
        got = greedy(llm, reference["prompts"], steps, LoRARequest("nbpeft", 1, str(out / "lora")))
    else:
        llm = LLM(model=str(out / "merged"), **common)
        got = greedy(llm, reference["prompts"], steps)
    same = sum(g == w for g, w in zip(got, reference["tokens"]))
    for g, w in zip(got, reference["tokens"]):
        if g != w:
            print(f"  vllm {which}: tokens differ: vLLM {g} vs nbpeft {w}")
    print(f"vllm {which}: same greedy tokens on {same}/{len(got)} prompts")
    (out / f"vllm_{which}_results.json").write_text(json.dumps({"same_greedy_tokens": same, "prompts": len(got)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
