"""The Modelfile's TEMPLATE, run by Go's text/template as Ollama runs it, gives the chat template's prompt.

Run with the project's environment:  python check_ollama.py OUT  (needs `go`; Debian's golang-go)
No Ollama binary is used: Ollama's own program is not in the package registries this check may use.
What is checked is the part of Ollama that decides quality after an export: the prompt its chat
endpoint builds (the Modelfile's SYSTEM first when a request has none, then TEMPLATE over the messages),
against the prompt the model was trained on (the tokenizer's chat template, rendered by transformers).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}],
    [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Green."},
     {"role": "user", "content": "And grass?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What colour is snow?"}],
]


def main(out: Path) -> int:
    text = (out / "gguf-f16" / "Modelfile").read_text()
    fields = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, re.S | re.M))
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    program = out / "ollama_template"
    built = subprocess.run(["go", "build", "-o", str(program), str(Path(__file__).with_name("ollama_template.go"))],
                           capture_output=True, text=True)
    if built.returncode:
        print(f"ollama template: go build failed: {built.stderr.strip()}")
        return 1
    same = 0
    for chat in CHATS:
        messages = chat if chat[0]["role"] == "system" or "SYSTEM" not in fields else \
            [{"role": "system", "content": fields["SYSTEM"]}] + chat
        done = subprocess.run([str(program)], text=True,
                              input=json.dumps({"template": fields["TEMPLATE"], "messages": messages}), capture_output=True)
        if done.returncode:
            print(f"ollama template: {done.stderr.strip()}")
            return 1
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        same += done.stdout == want
        if done.stdout != want:
            print(f"  ollama template differs:\n    Go:   {done.stdout!r}\n    chat: {want!r}")
    print(f"ollama template (Go text/template): same prompt as the chat template for {same}/{len(CHATS)} conversations")
    (out / "ollama_template_results.json").write_text(json.dumps({"same_prompt": same, "conversations": len(CHATS)}))
    return 0 if same == len(CHATS) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
