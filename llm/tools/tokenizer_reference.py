"""Token ids of varied strings from an independent tokenizer, for cleave-llm's tokenizer test.

The reference is Hugging Face's `tokenizers` (PyPI) given the GGUF file's own vocabulary and
merges, with the pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = "smollm"` (each digit
alone, then GPT-2's byte-level split) and the file's control tokens as special tokens. The BPE,
the byte-level mapping, the split regex and the special-token matching are all `tokenizers`'
code, none of it cleave-llm's.

    pip install gguf==0.19.0 tokenizers==0.23.3
    python llm/tools/tokenizer_reference.py SmolLM2-135M-Instruct.Q4_1.gguf \
        > llm/tests/data/smollm2-tokens.json
"""

import json
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

CONTROL = 3

# Varied on purpose: contractions, digits, runs of spaces and newlines, tabs, accents, CJK,
# emoji, code, chat markup, and nothing at all.
TEXTS = [
    "",
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "don't you'll I'M we've they'd it's",
    "  two leading spaces, three trailing   ",
    "line one\nline two\n\n\nfour newlines later",
    "\ttab\tseparated\tvalues\t",
    "naïve café déjà vu — “quotes” and ‘apostrophes’",
    "東京は日本の首都です。",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a  b   c    d",
    "UPPER lower MiXeD",
    "1234567890 0x1F 1e-9 -42",
    "Ünïcödé ÆØÅ ñ ß œ",
    "<not_special> <|im_start",
    "\u00a0non-breaking\u2003em space",
    "control bytes: bell\u0007 nul\u0000 escape\u001b[0m eot\u0004 (no token) ack\u0006",
]


def main(path: str) -> None:
    fields = GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types) if ty == CONTROL
    ])
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in TEXTS]
    version = __import__("tokenizers").__version__
    lines = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    sys.stdout.write(f'{{"reference": "tokenizers {version}", "cases": [\n{lines}\n]}}\n')


if __name__ == "__main__":
    main(sys.argv[1])
