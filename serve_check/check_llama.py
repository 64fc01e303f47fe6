"""llama.cpp (llama-cpp-python built from source) runs nbpeft's GGUF files like nbpeft runs the model.

Run with serve_check/.venv-llama:  python check_llama.py OUT BASE_F16_GGUF
Checks: the GGUF adapter on llama.cpp's own f16 conversion of the base, and the merged GGUF
models (f16, q8_0): greedy tokens equal nbpeft's, largest logit difference reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama


def run(llm: Llama, prompt: list[int], steps: int, reference: list[int]) -> tuple[list[int], float]:
    """Greedy tokens from llama.cpp, and the largest logit difference on nbpeft's own sequence."""
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    llm.reset()
    llm.eval(prompt + reference)
    return tokens, np.asarray(llm.scores[: llm.n_tokens]).copy()


def main(out: Path, base_gguf: str) -> None:
    reference = torch.load(out / "reference.pt")
    setups = {
        "gguf-adapter on llama.cpp's f16 base": dict(model_path=base_gguf, lora_path=str(out / "gguf-adapter" / "adapter.gguf")),
        "merged gguf f16": dict(model_path=str(out / "gguf-f16" / "model.gguf")),
        "merged gguf q8_0": dict(model_path=str(out / "gguf-q8_0" / "model.gguf")),
    }
    results = {}
    for label, kwargs in setups.items():
        llm = Llama(**kwargs, n_ctx=256, logits_all=True, n_threads=1, verbose=False, seed=0)
        same, worst = 0, 0.0
        for prompt, want, logits in zip(reference["prompts"], reference["tokens"], reference["logits"]):
            tokens, scores = run(llm, prompt, len(want), want)
            same += tokens == want
            worst = max(worst, float(np.abs(scores - logits.numpy()).max()))
            if tokens != want:
                print(f"  {label}: tokens differ: llama.cpp {tokens} vs nbpeft {want}", flush=True)
        results[label] = {"prompts": len(reference["prompts"]), "same_greedy_tokens": int(same), "max_abs_logit_diff": worst}
        print(f"{label}: same greedy tokens on {same}/{len(reference['prompts'])} prompts; "
              f"largest |logit difference| {worst:.4f}", flush=True)
        del llm
        # written after each setup: a crash inside llama.cpp (seen with q8_0 files) keeps what was measured
        (out / "llama_cpp_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
