"""llama.cpp (llama-cpp-python built from source) runs nbpeft's GGUF files like nbpeft runs the model.

Run with serve_check/.venv-llama:  python check_llama.py OUT BASE_F16_GGUF [BASE_Q8_0_GGUF [MERGED_F16_GGUF]]
Checks the GGUF adapter on llama.cpp's own f16 conversion of the base, and the merged GGUF models
(f16, q8_0, and the K-quants q4_k_m and q5_k_m). For each: free-running greedy tokens against nbpeft's,
and, teacher-forced on nbpeft's tokens, the largest logit difference and every step whose top token differs.

The tolerance is measured, not chosen: llama.cpp's own conversion of the base (same tensor type,
nothing from nbpeft) against nbpeft's base logits on the same tokens. For a K-quant it is llama.cpp's
own quantisation (``llama_model_quantize``, as ``llama-quantize`` runs it) of its own f16 conversion of
nbpeft's merged folder, against nbpeft's logits with the adapter on; nbpeft's K-quant file is also
compared with that one directly (tensor types, identical tensors, tokens, logits). A file from nbpeft passes when
its largest logit difference is within twice that, and a differing top token is counted as a
near-tie only where nbpeft's top two logits are closer than twice the tolerance (two logits each
off by up to the tolerance can swap there); any other differing token is an error.
Each model runs in a child process, so a crash inside llama.cpp is reported and the rest still run.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

K_QUANTS = ("q4_k_m", "q5_k_m")  # checked against llama.cpp's own quantisation of the merged model
LLAMA_LOG: list[bytes] = []  # llama.cpp's log while it quantises (one line per tensor), kept for its last line
LLAMA_LOG_CALLBACK: list = []

def evaluate(model_path: str, lora_path: str | None, out: Path, save: Path) -> None:
    """Child: greedy tokens and teacher-forced scores from llama.cpp, saved to ``save`` (.npz)."""
    from llama_cpp import Llama

    reference = torch.load(out / "reference.pt")
    llm = Llama(model_path=model_path, lora_path=lora_path, n_ctx=256, logits_all=True, n_threads=1,
                verbose=False, seed=0)
    arrays = {}
    for i, (prompt, want) in enumerate(zip(reference["prompts"], reference["tokens"])):
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(len(want)):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        llm.reset()
        llm.eval(prompt + want)
        arrays[f"tokens{i}"] = np.array(tokens)
        arrays[f"scores{i}"] = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32).copy()
    np.savez(save, **arrays)


def run_child(out: Path, name: str, model_path: str, lora_path: str | None = None) -> dict | str:
    """The child's arrays, or why there are none (a crash is reported by its signal)."""
    save = out / f"llama_{name}.npz"
    save.unlink(missing_ok=True)
    args = [sys.executable, __file__, "--evaluate", str(out), str(save), model_path] + ([lora_path] if lora_path else [])
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        return f"llama.cpp {how}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}"
    return dict(np.load(save))


def compare(got: dict, reference: dict, key: str, tolerance: float | None) -> dict:
    """Greedy agreement and teacher-forced differences of one llama.cpp run against nbpeft's ``key`` logits."""
    result = {"prompts": len(reference["prompts"]), "same_greedy_tokens": 0, "max_abs_logit_diff": 0.0,
              "steps": 0, "steps_same_top_token": 0, "greedy_parts": [], "near_ties": [], "errors": []}
    for i, (prompt, want) in enumerate(zip(reference["prompts"], reference["tokens"])):
        ours = reference[key][i].float().numpy()
        scores = got[f"scores{i}"]
        free = got[f"tokens{i}"].tolist()
        result["same_greedy_tokens"] += free == want
        if free != want:
            result["greedy_parts"].append({"prompt": i, "step": next(k for k, (a, b) in enumerate(zip(free, want)) if a != b)})
        result["max_abs_logit_diff"] = max(result["max_abs_logit_diff"], float(np.abs(scores - ours).max()))
        for step in range(len(want)):
            position = len(prompt) - 1 + step
            top = int(np.argmax(scores[position]))
            ours_top = int(np.argmax(ours[position]))
            result["steps"] += 1
            if top == ours_top:
                result["steps_same_top_token"] += 1
                continue
            gap = float(ours[position, ours_top] - ours[position, top])
            where = {"prompt": i, "step": step, "nbpeft": ours_top, "llama.cpp": top, "nbpeft_gap": round(gap, 5)}
            near = tolerance is not None and gap < 2 * tolerance
            result["near_ties" if near else "errors"].append(where)
    if tolerance is not None:
        result["tolerance"] = tolerance
        result["passed"] = not result["errors"] and result["max_abs_logit_diff"] <= 2 * tolerance
    return result


def quantise(source: str, target: Path, quant: str) -> tuple[str | None, str]:
    """llama.cpp's own ``quant`` of the GGUF ``source`` into ``target``: (its path, "") or (None, llama.cpp's last line)."""
    import llama_cpp

    lines = LLAMA_LOG
    lines.clear()
    LLAMA_LOG_CALLBACK.append(llama_cpp.llama_log_callback(lambda level, text, _: lines.append(text)))
    llama_cpp.llama_log_set(LLAMA_LOG_CALLBACK[-1], None)  # llama.cpp keeps calling it: it lives as long as the module
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = 1
    code = llama_cpp.llama_model_quantize(source.encode(), str(target).encode(), ctypes.byref(params))
    why = b"".join(lines).decode(errors="replace").strip().splitlines() or [f"code {code}"]
    return (str(target), "") if code == 0 else (None, f"llama.cpp's quantiser failed: {why[-1]}")


def tensor_agreement(ours: str, theirs: str) -> dict:
    """Tensor by tensor, nbpeft's file against llama.cpp's own: same names, same types, identical bytes."""
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    common = sorted(set(a) & set(b))
    same_type = [n for n in common if a[n].tensor_type == b[n].tensor_type]
    return {"tensors": len(b), "only_in_ours": sorted(set(a) - set(b)), "only_in_theirs": sorted(set(b) - set(a)),
            "same_type": len(same_type), "types_differ": [n for n in common if n not in same_type],
            "identical": sum(np.array_equal(a[n].data, b[n].data) for n in same_type)}


def run_agreement(ours: dict, theirs: dict, reference: dict) -> dict:
    """Two llama.cpp runs on the same tokens: greedy tokens, teacher-forced top tokens, largest logit difference."""
    result = {"prompts": len(reference["prompts"]), "same_greedy_tokens": 0, "steps": 0, "steps_same_top_token": 0,
              "max_abs_logit_diff": 0.0}
    for i, (prompt, want) in enumerate(zip(reference["prompts"], reference["tokens"])):
        result["same_greedy_tokens"] += np.array_equal(ours[f"tokens{i}"], theirs[f"tokens{i}"])
        positions = slice(len(prompt) - 1, len(prompt) - 1 + len(want))
        a, b = ours[f"scores{i}"][positions], theirs[f"scores{i}"][positions]
        result["steps"] += len(a)
        result["steps_same_top_token"] += int((a.argmax(-1) == b.argmax(-1)).sum())
        result["max_abs_logit_diff"] = max(result["max_abs_logit_diff"], float(np.abs(ours[f"scores{i}"] - theirs[f"scores{i}"]).max()))
    return result


def main(out: Path, base_f16: str, base_q8_0: str | None, merged_f16: str | None = None) -> int:
    reference = torch.load(out / "reference.pt")
    adapter_effect = max(float((a - b).abs().max()) for a, b in zip(reference["logits"], reference["base_logits"]))
    print(f"(the adapter moves nbpeft's logits by up to {adapter_effect:.2f}: an adapter lost on the way shows as that)")
    tolerances: dict[str, float | None] = {}
    results: dict[str, dict | str] = {}
    own_runs: dict[str, dict] = {}
    references = [("f16", base_f16, "base", "base_logits"), ("q8_0", base_q8_0, "base", "base_logits")]
    why_not = {}
    for quant in K_QUANTS:
        own, why_not[quant] = quantise(merged_f16, out / f"merged-{quant}.gguf", quant) if merged_f16 else (None, "")
        references.append((quant, own, "merged", "logits"))
    for quant, path, what, key in references:
        label = f"llama.cpp's own {quant} conversion of the {what} model (tolerance)"
        got = run_child(out, f"own_{what}_{quant}", path) if path else why_not.get(quant) or "not converted"
        if isinstance(got, str):
            tolerances[quant] = None
            results[label] = got
            print(f"{label}: {got}", flush=True)
            continue
        own_runs[quant] = got
        result = compare(got, reference, key, None)
        tolerances[quant] = result["max_abs_logit_diff"]
        results[label] = result
        extra = "" if key == "base_logits" else (f"; same greedy tokens on {result['same_greedy_tokens']}/{result['prompts']} "
                                                  f"prompts, top token equal on {result['steps_same_top_token']}/{result['steps']} steps")
        print(f"{label}: largest |logit difference| {tolerances[quant]:.4f} (against nbpeft with the adapter "
              f"{'off' if key == 'base_logits' else 'on'}){extra}")

    setups = {
        "gguf-adapter on llama.cpp's f16 base": ("f16", base_f16, str(out / "gguf-adapter" / "adapter.gguf")),
        "merged gguf f16": ("f16", str(out / "gguf-f16" / "model.gguf"), None),
        "merged gguf q8_0": ("q8_0", str(out / "gguf-q8_0" / "model.gguf"), None),
        **{f"merged gguf {quant}": (quant, str(out / f"gguf-{quant}" / "model.gguf"), None) for quant in K_QUANTS},
    }
    failed = 0
    for label, (quant, model_path, lora_path) in setups.items():
        got = run_child(out, label.split()[0] + "_" + quant, model_path, lora_path)
        if isinstance(got, str):
            results[label] = got
            failed += 1
            print(f"{label}: {got}", flush=True)
            continue
        result = compare(got, reference, "logits", tolerances[quant])
        results[label] = result
        failed += not result.get("passed", False)
        verdict = {True: "passed", False: "FAILED"}.get(result.get("passed"), "no tolerance measured")
        print(f"{label}: {verdict}; same greedy tokens on {result['same_greedy_tokens']}/{result['prompts']} prompts; "
              f"teacher-forced top token equal on {result['steps_same_top_token']}/{result['steps']} steps; "
              f"largest |logit difference| {result['max_abs_logit_diff']:.4f} "
              f"(tolerance {tolerances[quant] if tolerances[quant] is None else round(tolerances[quant], 4)})", flush=True)
        for where in result["greedy_parts"]:
            print(f"  free-running greedy parts from nbpeft's: prompt {where['prompt']} at step {where['step']}")
        for kind in ("near_ties", "errors"):
            for where in result[kind]:
                print(f"  {kind[:-1].replace('_', '-')}: prompt {where['prompt']} step {where['step']}: nbpeft "
                      f"{where['nbpeft']}, llama.cpp {where['llama.cpp']}, nbpeft's gap {where['nbpeft_gap']}")
        if quant in K_QUANTS and quant in own_runs:
            tensors = tensor_agreement(model_path, str(out / f"merged-{quant}.gguf"))
            runs = run_agreement(got, own_runs[quant], reference)
            result["against llama.cpp's own"] = {"tensors": tensors, "runs": runs}
            same = not tensors["only_in_ours"] and not tensors["only_in_theirs"] and not tensors["types_differ"]
            failed += not same
            print(f"  against llama.cpp's own {quant}: {'same' if same else 'DIFFERENT'} tensor types on "
                  f"{tensors['same_type']}/{tensors['tensors']} tensors, identical data in {tensors['identical']}; "
                  f"same greedy tokens on {runs['same_greedy_tokens']}/{runs['prompts']} prompts; top token equal on "
                  f"{runs['steps_same_top_token']}/{runs['steps']} steps; largest |logit difference| {runs['max_abs_logit_diff']:.4f}")
    (out / "llama_cpp_results.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1] == "--evaluate":
        evaluate(sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None, Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main(Path(sys.argv[1]), *sys.argv[2:5]))
