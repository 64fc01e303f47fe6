"""PiSSA / OLoRA parity with the reference `peft`: the same A, B and residual base, files read both ways.

On a tiny random Llama (all linear layers, r=4, alpha=8) this prints the largest absolute
difference between nbpeft's and the reference's

- ``lora_A``, ``lora_B`` and the residual base weight after attach, for init ``pissa``,
  ``pissa_niter_4`` and ``olora`` (the randomised SVD draws from a stream seeded with 0 in
  nbpeft; the reference's ``svd_lowrank`` is seeded the same way here for the comparison);
- the logits of a "trained" adapter (A and B moved at random) saved by nbpeft and loaded by
  the reference on the original model, and the other way round;
- the logits of that adapter saved with ``as_plain_lora=True`` (nbpeft) and loaded by the
  reference, against the adapter itself.

Run from the repo root in the benchmark venv (the only place `peft` is installed):

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/lora_inits_parity.py
"""

from __future__ import annotations

import copy
import tempfile

import peft
import torch
import transformers
from peft.tuners.lora import layer as reference_layer

import nbpeft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_svd_lowrank = reference_layer.svd_lowrank


def _seeded_svd_lowrank(*args, **kwargs):
    torch.manual_seed(0)
    return _svd_lowrank(*args, **kwargs)


reference_layer.svd_lowrank = _seeded_svd_lowrank


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


INPUT = torch.arange(24).reshape(2, 12) % 128


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def layers(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, base weight) of every LoRA layer, by base-model path."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            path = name.replace("base_model.model.", "")
            adapter = "default"
            found[path] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                           module.base_layer.weight.detach())
    return found


def train_a_little(params) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)


def main() -> None:
    print(f"peft {peft.__version__}, torch {torch.__version__}")
    print(f"{'init':<14} {'max |ΔA|':>10} {'max |ΔB|':>10} {'max |Δbase|':>12} {'max |B·A|':>10}")
    for init in ("pissa", "pissa_niter_4", "olora"):
        base = tiny_llama()
        ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                          init_lora_weights=init))
        ours = copy.deepcopy(base)
        nbpeft.attach(ours, "lora", r=4, alpha=8, targets=TARGETS, init=init)
        theirs, mine = layers(ref), layers(ours)
        assert theirs.keys() == mine.keys(), (sorted(theirs), sorted(mine))
        diff = [max((t[i] - mine[k][i]).abs().max().item() for k, t in theirs.items()) for i in range(3)]
        size = max((t[1] @ t[0]).abs().max().item() for t in theirs.values())
        print(f"{init:<14} {diff[0]:>10.2e} {diff[1]:>10.2e} {diff[2]:>12.2e} {size:>10.3f}")

    print(f"\n{'file check':<52} {'max |Δlogits|':>14}")
    for init in ("pissa", "olora"):
        with tempfile.TemporaryDirectory() as folder:
            ours = tiny_llama()
            nbpeft.attach(ours, "lora", r=4, alpha=8, targets=TARGETS, init=init)
            train_a_little(nbpeft.core.trainable_parameters(ours))
            expected = logits(ours)
            nbpeft.save_adapter(ours, f"{folder}/native")
            nbpeft.save_adapter(ours, f"{folder}/plain", as_plain_lora=True)
            loaded = peft.PeftModel.from_pretrained(tiny_llama(), f"{folder}/native").eval()
            print(f"{init + ': nbpeft file -> reference':<52} {(logits(loaded) - expected).abs().max().item():>14.2e}")
            plain = peft.PeftModel.from_pretrained(tiny_llama(), f"{folder}/plain").eval()
            print(f"{init + ': nbpeft as_plain_lora file -> reference':<52} "
                  f"{(logits(plain) - expected).abs().max().item():>14.2e}")

            ref = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                    init_lora_weights=init))
            train_a_little([p for p in ref.parameters() if p.requires_grad])
            ref.eval()
            ref.save_pretrained(f"{folder}/reference")
            mine = tiny_llama()
            nbpeft.load_adapter(mine, f"{folder}/reference")
            print(f"{init + ': reference file -> nbpeft':<52} {(logits(mine) - logits(ref)).abs().max().item():>14.2e}")


if __name__ == "__main__":
    main()
