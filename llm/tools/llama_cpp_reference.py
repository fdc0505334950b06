"""Greedy generations and logits of SmolLM2 from llama.cpp, for cleave-llm's model test.

llama.cpp (through the PyPI package `llama-cpp-python`, which builds it from source) is the
independent reference: its own GGUF loader, kernels and RoPE. For each prompt it records the
prompt's token ids, the ten largest logits after the prompt, and the first tokens of greedy
decoding with, at each step, the margin between the chosen token's logit and the next best.

    pip install llama-cpp-python==0.3.36   # builds llama.cpp: minutes on two cores
    python llm/tools/llama_cpp_reference.py SmolLM2-135M-Instruct.Q4_1.gguf \
        > llm/tests/data/smollm2-llama-cpp.json
"""

import json
import sys

import llama_cpp
from llama_cpp import Llama

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at 100 degrees Celsius. At what temperature does it freeze?",
]
STEPS = 24
TOP = 10


def main(path: str) -> None:
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                seed=0)
    cases = []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = [float(v) for v in llm.scores[llm.n_tokens - 1]]
        top = sorted(range(len(logits)), key=lambda i: -logits[i])[:TOP]
        generated, margins = [], []
        for _ in range(STEPS):
            row = llm.scores[llm.n_tokens - 1]
            first, second = sorted(range(len(row)), key=lambda i: -row[i])[:2]
            generated.append(int(first))
            # How clear the choice was: a near tie may go either way in another
            # implementation's arithmetic.
            margins.append(round(float(row[first] - row[second]), 4))
            llm.eval([first])
        cases.append({
            "prompt": prompt,
            "prompt_ids": ids,
            "top": [[i, logits[i]] for i in top],
            "greedy": generated,
            "margins": margins,
        })
    lines = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    sys.stdout.write(f'{{"reference": "llama-cpp-python {llama_cpp.__version__}", '
                     f'"steps": {STEPS}, "cases": [\n{lines}\n]}}\n')


if __name__ == "__main__":
    main(sys.argv[1])
