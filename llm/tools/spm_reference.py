"""A small SentencePiece vocabulary as GGUF, and sentencepiece's own token ids of varied
strings, for cleave-llm's SentencePiece-style ("llama") tokenizer test.

The script trains a byte-fallback BPE model with the real `sentencepiece` library on the
text below (written for this test, so under the project's license), writes its pieces,
scores and types as a tokenizer-only GGUF file the way llama.cpp's converter does
(`tokenizer.ggml.model = "llama"`), and records what sentencepiece itself encodes.

The normalizer is Llama 2's: rule "identity" (no NFKC, so that the comparison tests the
tokenizer and not Unicode normalization), no removal of extra whitespace, and a dummy
prefix ("▁" before the text, llama.cpp's `add_space_prefix`). `character_coverage` is below
1, so that the rarest characters of the text, like those it never saw, take the byte
fallback (`<0xE2>`, …).

Each case has:
- `ids`: `sp.encode(text)`, what cleave-llm must give without parsing control tokens
  (sentencepiece never matches `<s>` in text);
- `ids_special`: the text cut at the control tokens (`<s>`, `</s>`, `<unk>`), each text
  piece encoded by sentencepiece (so with its dummy prefix) and the control ids between:
  llama.cpp's rule when it parses control tokens (a space prefix on the first text piece
  and on each one after a control token);
- `ids_no_prefix`: the same model with `add_dummy_prefix = false`, for
  `tokenizer.ggml.add_space_prefix = false`.

    /opt/cleave-tools/bin/pip install gguf==0.19.0 sentencepiece==0.2.3
    /opt/cleave-tools/bin/python llm/tools/spm_reference.py \
        llm/tests/data/spm-bpe.gguf llm/tests/data/spm-bpe-tokens.json
"""

import io
import json
import re
import sys

import sentencepiece as spm
from gguf import GGUFWriter, TokenType
from sentencepiece import sentencepiece_model_pb2

VOCAB_SIZE = 800

TRAINING_TEXT = """\
The lighthouse keeper woke before dawn, as she had every morning for eleven years.
She climbed the hundred and twelve steps, wiped the salt from the great lens, and wrote
the weather in her book: wind from the north-west, sea moderate, visibility good.
Ships passed in the distance, their lights moving slowly along the horizon.
In the afternoon she walked down to the harbour to buy bread, apples and a newspaper.
The baker asked about the storm that was coming; she said it would arrive on Thursday.
Her brother wrote letters from the city, long letters about trains, markets and music.
He worked in a small office near the station, counting numbers for a shipping company.
Every evening the town lit its lamps one by one, and the children ran home for supper.
A traveller once asked her whether she was lonely. She laughed and pointed at the sea.
"How could anyone be lonely here?" she said. "The water talks all day and all night."
The old fisherman mended his nets on the quay, singing songs his grandfather had taught him.
Gulls circled above the boats, waiting for the fish that fell back into the water.
When winter came, the days grew short and the nights grew long and cold.
The keeper read books by the fire: histories, poems, and a manual for repairing engines.
She learned to fix the generator herself, because the mechanic lived three villages away.
On clear nights she counted stars and named the constellations she remembered.
Spring returned with rain, then with flowers on the cliffs, yellow and white and blue.
The first boat of the season carried visitors who wanted to see the famous light.
She showed them the stairs, the lens, the logbook, and the view over the bay.
Numbers and dates: 1 2 3 4 5 6 7 8 9 10, 2024-03-15, 12:45, 3.14159, 42, 1000000.
Prices were 19.99, 250, and 7; the ferry left at 08:30 and returned at 17:15.
Code lines looked like this: for i in range(10): print(i * 2) and x = y + 1;
fn main() { let total = values.iter().sum(); println!("{}", total); }
if (count > 0) { return count - 1; } else { return 0; }
Le gardien du phare était très âgé, mais il montait l'escalier chaque soir.
La mer était calme; les bateaux rentraient au port avant la nuit, à l'heure du dîner.
Café, crème, façade, naïve, déjà vu, élève, hôpital, forêt, où, garçon, Noël.
Die Straße am Hafen war nass, und die Möwen schrien über den Dächern der Häuser.
Größe, Übung, schön, müde, Fähre, Brücke, Köln, München, Zürich.
El faro estaba en la costa norte; el viento soplaba fuerte en la mañana de invierno.
Niño, año, señor, mañana, corazón, canción, información, país, día.
灯台の守り人は毎朝早く起きて、海と空を見ていました。
東京は日本の首都です。今日は天気がいいです。海は青くて、空は広いです。
我们在海边散步，看见很多船。今天的天气很好。
Какой красивый маяк на берегу моря.
The keeper wrote to her brother: the storm has passed, the light is still burning.
He answered that the city was noisy, that trains were late, and that he missed the sea.
In summer they met at the harbour, ate fish and bread, and talked until midnight.
The lighthouse still stands today, white against the grey water and the green hills.
People who visit it say that the wind sounds like a voice calling from far away.
Rare signs appear once: ☃ ♞ ∮ Ω ≈ ç √ ∫ 🙂 🌊 ⚓.
"""

TEXTS = [
    "",
    "Hello, world!",
    "The keeper climbed the stairs.",
    " one leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces    inside",
    " ",
    "   ",
    "line one\nline two\n\nline four\n",
    "\ttabs\tand\tspaces ",
    "The year 2024 had 366 days; pi is 3.14159 and 1000000 is big.",
    "naïve café déjà vu, Straße, Zürich, São Paulo, Kraków, Reykjavík",
    "東京は日本の首都です。",
    "我们在海边散步",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "rare signs ☃ ♞ ∮ and unseen ones ∑ ∂ ♛ ⌘",
    "<s> inside the text </s>",
    "a</s>b<s>c",
    "<s></s>",
    "<unk> and <0x41> are text",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "UPPER lower MiXeD",
    "the the the the the the the",
    "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ (NFKC would change these)",
    "▁ an escape character already in the text",
    "control characters: bell\u0007 escape\u001b[0m",
    "ab" * 300,
]

CONTROL_SPLIT = re.compile(r"(</s>|<s>|<unk>)")


def train() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def token_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_byte(i):
        return TokenType.BYTE
    if sp.is_unused(i):
        return TokenType.UNUSED
    return TokenType.NORMAL


def write_gguf(sp: spm.SentencePieceProcessor, path: str) -> None:
    n = sp.get_piece_size()
    writer = GGUFWriter(path, "llama")
    writer.add_name("spm-bpe-test-vocabulary")
    writer.add_description(
        "A tokenizer-only test file: a byte-fallback SentencePiece BPE model trained by "
        "cleave's llm/tools/spm_reference.py on text written for it"
    )
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([int(token_type(sp, i)) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(gguf_path: str, json_path: str) -> None:
    proto = train()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == VOCAB_SIZE
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    no_prefix = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    controls = {sp.id_to_piece(i): i for i in range(VOCAB_SIZE)
                if sp.is_control(i) or sp.is_unknown(i)}
    assert set(controls) == {"<s>", "</s>", "<unk>"}, controls

    cases = []
    for text in TEXTS:
        ids = sp.encode(text)
        if "▁" not in text:
            assert sp.decode(ids) == text, text
        special = []
        for part in CONTROL_SPLIT.split(text):
            if part in controls:
                special.append(controls[part])
            elif part:
                special.extend(sp.encode(part))
        cases.append({"text": text, "ids": ids, "ids_special": special,
                      "ids_no_prefix": no_prefix.encode(text)})
    fallback = sum(1 for c in cases if any(sp.is_byte(i) for i in c["ids"]))
    assert fallback >= 5, fallback

    write_gguf(sp, gguf_path)
    lines = ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases)
    with open(json_path, "w", encoding="utf-8") as out:
        out.write(f'{{"reference": "sentencepiece {spm.__version__}", '
                  f'"vocab_size": {VOCAB_SIZE}, "cases": [\n{lines}\n]}}\n')


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
