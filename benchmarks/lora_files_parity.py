"""LoRA files both ways: every LoRA option the reference `peft` saves, read and written by nbpeft.

For each case a tiny random model (fixed seed) gets a reference adapter with the option set
and every trainable tensor drawn at random (B non-zero), which the reference saves;
nbpeft loads the folder into a fresh copy of the same model and the logits are compared.
Then the other way: nbpeft attaches the same options, draws its tensors, saves, and the
reference loads nbpeft's folder. The table prints the largest absolute logit difference
each way (fp32; 0 or float rounding is a pass), beside how far the adapter moves the logits
from the base model's (so a file that loads as nothing cannot pass).

Run it from the repo root in the benchmark venv (the only place `peft` is installed):

    PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/lora_files_parity.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config, LlamaConfig

import nbpeft

TOLERANCE = 1e-5
LLAMA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)
GPT2 = GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64)
BERT = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64, num_labels=3)

# name, model config, reference LoraConfig keywords, the same adapter as nbpeft.attach keywords
CASES = [
    ("rank_pattern + alpha_pattern", LLAMA,
     {"target_modules": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"v_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
      "alpha_pattern": {"down_proj": 3}},
     {"targets": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"v_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
      "alpha_pattern": {"down_proj": 3}}),
    ("rslora + rank_pattern", LLAMA,
     {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank_pattern": {"q_proj": 16}},
     {"targets": ["q_proj", "v_proj"], "rslora": True, "rank_pattern": {"q_proj": 16}}),
    ("layers_to_transform", LLAMA,
     {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2]},
     {"targets": ["q_proj", "v_proj"], "layers": [0, 2]}),
    ("layers_to_transform + layers_pattern", LLAMA,
     {"target_modules": ["k_proj", "up_proj"], "layers_to_transform": 1, "layers_pattern": "layers"},
     {"targets": ["k_proj", "up_proj"], "layers": 1, "layers_pattern": "layers"}),
    ("layers_pattern on GPT-2 (h, Conv1D)", GPT2,
     {"target_modules": ["c_attn"], "layers_to_transform": [1, 2], "layers_pattern": "h", "fan_in_fan_out": True},
     {"targets": ["c_attn"], "layers": [1, 2], "layers_pattern": "h"}),
    ("exclude_modules (names)", LLAMA,
     {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
     {"targets": ["q_proj", "v_proj"], "exclude": ["layers.1.self_attn.q_proj"]}),
    ("exclude_modules (regex)", LLAMA,
     {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"},
     {"targets": "all-linear", "exclude": r".*\.mlp\..*"}),
    ("lora_bias", LLAMA,
     {"target_modules": ["q_proj", "o_proj"], "lora_bias": True},
     {"targets": ["q_proj", "o_proj"], "lora_bias": True}),
    ("embedding LoRA", LLAMA,
     {"target_modules": ["embed_tokens", "q_proj"]},
     {"targets": ["embed_tokens", "q_proj"]}),
    ("embedding LoRA + alpha_pattern", LLAMA,
     {"target_modules": ["embed_tokens", "v_proj"], "alpha_pattern": {"embed_tokens": 32}, "rank_pattern": {"embed_tokens": 4}},
     {"targets": ["embed_tokens", "v_proj"], "alpha_pattern": {"embed_tokens": 32}, "rank_pattern": {"embed_tokens": 4}}),
    ("trainable_token_indices", LLAMA,
     {"target_modules": ["q_proj"], "trainable_token_indices": [3, 17, 40]},
     {"targets": ["q_proj"], "token_rows": [3, 17, 40]}),
    ("BERT classifier: modules_to_save + layers", BERT,
     {"target_modules": ["query", "value"], "layers_to_transform": [0, 1], "task_type": "SEQ_CLS"},
     {"targets": ["query", "value"], "layers": [0, 1]}),
    ("DoRA + rank_pattern", LLAMA,
     {"target_modules": ["q_proj", "v_proj"], "use_dora": True, "rank_pattern": {"v_proj": 2}},
     {"targets": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}}),
]


def base_model(config):
    torch.manual_seed(0)
    if isinstance(config, BertConfig):
        return AutoModelForSequenceClassification.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def randomise(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def reference_to_nbpeft(config, ref_kwargs: dict, ids: torch.Tensor, folder: Path) -> tuple[float, float]:
    """(nbpeft's difference from the reference, the adapter's own effect on the logits)."""
    base = base_model(config)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **ref_kwargs))
    randomise([p for p in peft_model.parameters() if p.requires_grad], seed=1)
    peft_model.save_pretrained(folder)
    expected = logits(peft_model.eval(), ids)
    model = copy.deepcopy(base)
    nbpeft.load_adapter(model, folder)
    effect = (expected - logits(base, ids)).abs().max().item()
    return (logits(model, ids) - expected).abs().max().item(), effect


def nbpeft_to_reference(config, ref_kwargs: dict, nb_kwargs: dict, ids: torch.Tensor, folder: Path) -> float:
    base = base_model(config)
    model = copy.deepcopy(base)
    method = "dora" if ref_kwargs.get("use_dora") else "lora"
    options = dict(nb_kwargs)
    token_rows = options.pop("token_rows", None)
    nbpeft.attach(model, method, r=4, alpha=8, **options)
    if token_rows:  # what nbpeft.add_tokens does once the tokenizer has named the ids
        nbpeft.data.new_tokens.add_rows(model, "default", {"model.embed_tokens": token_rows})
    randomise(nbpeft.core.adapter_parameters(model, "default").values(), seed=2)
    nbpeft.save_adapter(model, folder)
    expected = logits(model, ids)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    return (logits(peft_model, ids) - expected).abs().max().item()


def main() -> int:
    warnings.filterwarnings("ignore")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    rows, failed = [], False
    for name, config, ref_kwargs, nb_kwargs in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            forward, effect = reference_to_nbpeft(config, ref_kwargs, ids, Path(tmp) / "ref")
            back = nbpeft_to_reference(config, ref_kwargs, nb_kwargs, ids, Path(tmp) / "nb")
        failed |= max(forward, back) > TOLERANCE or effect < 1e-3  # an adapter that changes nothing proves nothing
        rows.append((name, forward, back, effect))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  reference -> nbpeft  nbpeft -> reference  adapter's effect   (max |logit difference|)")
    for name, forward, back, effect in rows:
        print(f"{name:<{width}}  {forward:>19.2e}  {back:>19.2e}  {effect:>16.2e}")
    print("FAIL" if failed else f"all within {TOLERANCE:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
