"""Decode speed and time to first token of llama.cpp, measured as docs/llm.md says.

`Llama(model_path, n_ctx=256, n_threads=2)`, `eval` of the prompt (the time to the first
token), then N × (`sample(top_k=1)`, `eval`) timed with `time.perf_counter` (the Python loop
is included in the figure). Prints one line per run.

    python llm/tools/llama_cpp_speed.py SmolLM2-135M-Instruct.Q4_1.gguf [runs] [tokens]
"""

import sys
import time

from llama_cpp import Llama

PROMPT = "Once upon a time, in a small village,"


def main(path: str, runs: int, tokens: int) -> None:
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=0)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(tokens):
            token = llm.sample(top_k=1)
            llm.eval([token])
        elapsed = time.perf_counter() - start
        print(f"prompt {len(ids)} tokens, first token after {first * 1e3:.1f} ms; "
              f"{tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5,
         int(sys.argv[3]) if len(sys.argv) > 3 else 64)
