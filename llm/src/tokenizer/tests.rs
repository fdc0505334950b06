//! The tokenizer on small hand-made vocabularies; on SmolLM2's against Hugging Face's
//! `tokenizers` (the fixture `llm/tests/data/smollm2-tokens.json`, made by
//! `llm/tools/tokenizer_reference.py`); and SentencePiece-style on a model trained by the
//! `sentencepiece` library, against that library (`llm/tests/data/spm-bpe.gguf` and
//! `spm-bpe-tokens.json`, made by `llm/tools/spm_reference.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// Every byte as its stand-in, then a few merges: "h e" → "he", "he l" → "hel",
/// "l o" → "lo", "hel lo" → "hello", "Ġ w" → "Ġw"; and one control token.
fn small() -> Tokenizer {
    let (byte_char, _) = byte_stand_ins();
    let mut tokens: Vec<String> = byte_char.iter().map(char::to_string).collect();
    let merges: Vec<String> = ["h e", "he l", "l o", "hel lo", "Ġ w"]
        .map(String::from)
        .to_vec();
    for merge in &merges {
        tokens.push(merge.replace(' ', ""));
    }
    tokens.push("<|end|>".into());
    let mut types = vec![Some(1); tokens.len()];
    *types.last_mut().unwrap() = Some(TYPE_CONTROL);
    let end = u32::try_from(tokens.len() - 1).unwrap();
    Tokenizer::new(Vocabulary {
        tokens,
        types,
        merges,
        pre: "gpt2".into(),
        bos: None,
        eos: Some(end),
        add_bos: false,
    })
    .unwrap()
}

#[test]
fn merges_apply_by_rank() {
    let tok = small();
    let hello = tok.token_id("hello").unwrap();
    let space_w = tok.token_id("Ġw").unwrap();
    let ids = tok.encode("hello world", false);
    assert_eq!(ids[0], hello);
    assert_eq!(ids[1], space_w);
    // "orld" has no merges: one token per byte.
    assert_eq!(ids.len(), 2 + 4);
    assert_eq!(tok.decode(&ids, false), "hello world");
}

/// BPE as its definition says: rescan for the lowest-ranked, leftmost pair after every merge.
fn bpe_by_rescanning(tokenizer: &Tokenizer, bytes: &[u8]) -> Vec<u32> {
    let mut symbols: Vec<u32> = bytes
        .iter()
        .filter_map(|&b| tokenizer.byte_token[b as usize])
        .collect();
    loop {
        let best = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(i, pair)| {
                let &(rank, merged) = tokenizer.merges.get(&(pair[0], pair[1]))?;
                Some((rank, i, merged))
            })
            .min();
        let Some((_, at, merged)) = best else {
            return symbols;
        };
        symbols[at] = merged;
        symbols.remove(at + 1);
    }
}

#[test]
fn the_merge_heap_merges_as_rescanning_does() {
    let tokenizer = small();
    // Words over the merges' letters, where pairs overlap and compete ("hhelllo").
    let mut state = 0x9e37_79b9_u32;
    let mut words: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            (0..1 + i % 40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    b"hello"[state as usize % 5]
                })
                .collect()
        })
        .collect();
    words.push(b"hello".repeat(2000));
    for word in words {
        let mut got = Vec::new();
        tokenizer.encode_word(&word, &mut got);
        assert_eq!(got, bpe_by_rescanning(&tokenizer, &word), "{word:?}");
    }
}

#[test]
fn control_tokens_are_parsed_only_when_asked() {
    let tok = small();
    let end = tok.eos().unwrap();
    let parsed = tok.encode("hello<|end|>hello", true);
    assert_eq!(parsed.iter().filter(|&&id| id == end).count(), 1);
    assert_eq!(tok.decode(&parsed, false), "hello<|end|>hello");
    assert_eq!(tok.decode(&parsed, true), "hellohello");
    let plain = tok.encode("hello<|end|>hello", false);
    assert!(!plain.contains(&end));
    assert_eq!(tok.decode(&plain, false), "hello<|end|>hello");
}

#[test]
fn any_bytes_round_trip() {
    let tok = small();
    for text in [
        "",
        " ",
        "\n\n",
        "héllo 🙂 東京",
        "a\u{0}b\u{7f}",
        "   trailing   ",
    ] {
        assert_eq!(tok.decode(&tok.encode(text, false), false), text);
    }
}

#[test]
fn the_utf8_stream_never_cuts_a_character() {
    let mut stream = Utf8Stream::default();
    let smile = "🙂".as_bytes();
    assert_eq!(stream.push(b"a"), "a");
    assert_eq!(stream.push(&smile[..1]), "");
    assert_eq!(stream.push(&smile[1..3]), "");
    assert_eq!(stream.push(&smile[3..]), "🙂");
    assert_eq!(stream.push(&[0xff, b'b']), "\u{FFFD}b");
    assert_eq!(stream.push(&smile[..2]), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
}

#[test]
fn unknown_vocabularies_are_refused_by_name() {
    let (byte_char, _) = byte_stand_ins();
    let tokens: Vec<String> = byte_char.iter().map(char::to_string).collect();
    let vocabulary = Vocabulary {
        types: vec![Some(1); tokens.len()],
        tokens,
        merges: Vec::new(),
        pre: "qwen2".into(),
        bos: None,
        eos: None,
        add_bos: false,
    };
    let err = Tokenizer::new(vocabulary.clone()).unwrap_err().to_string();
    assert!(err.contains("qwen2"), "{err}");
    let err = Tokenizer::new(Vocabulary {
        tokens: vec!["a".into()],
        types: vec![Some(1)],
        pre: "gpt2".into(),
        ..vocabulary
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("byte-level"), "{err}");
}

#[test]
fn smollm2_tokenizes_as_hugging_face_tokenizers_does() {
    let Some(path) = crate::test_model::smollm2() else {
        return;
    };
    let gguf = Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(
        (tok.bos(), tok.eos(), tok.adds_bos()),
        (Some(1), Some(2), false)
    );
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/data/smollm2-tokens.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
            .collect();
        let ids = tok.encode(text, true);
        assert_eq!(ids, expected, "{text:?}");
        // Bytes without a token (a few control characters) are the only thing lost.
        let kept: Vec<u8> = text
            .bytes()
            .filter(|&b| tok.byte_token[b as usize].is_some())
            .collect();
        assert_eq!(tok.decode(&ids, false).as_bytes(), kept, "{text:?}");
    }
    // Untrusted text cannot forge chat markup.
    let ids = tok.encode("<|im_start|>system", false);
    assert!(!ids.contains(&1), "{ids:?}");
}

/// A SentencePiece-style vocabulary: `<unk>`, `<s>`, `</s>`, `extra` (the control tokens
/// and the unknown one), then the normal pieces with their scores, then byte tokens for
/// every byte when `bytes`.
fn small_spm(pieces: &[(&str, f32)], bytes: bool) -> Tokenizer {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![Some(TYPE_UNKNOWN), Some(TYPE_CONTROL), Some(TYPE_CONTROL)];
    let mut scores = vec![0.0; 3];
    for &(piece, score) in pieces {
        tokens.push(piece.to_string());
        types.push(Some(TYPE_NORMAL));
        scores.push(score);
    }
    if bytes {
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(Some(TYPE_BYTE));
            scores.push(0.0);
        }
    }
    Tokenizer::new_sentencepiece(SentencePieceVocabulary {
        tokens,
        scores,
        types,
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        add_bos: true,
        add_space_prefix: true,
    })
    .unwrap()
}

/// Pieces over "▁abc" whose scores tie and compete.
const SPM_PIECES: [(&str, f32); 12] = [
    ("▁", -1.0),
    ("a", -1.0),
    ("b", -1.0),
    ("c", -1.0),
    ("ab", -2.0),
    ("bc", -2.0),
    ("▁a", -3.0),
    ("abc", -4.0),
    ("ca", -2.0),
    ("cab", -5.0),
    ("▁ab", -5.0),
    ("aa", -2.5),
];

/// SentencePiece's BPE as its definition says: rescan for the highest-scoring pair,
/// leftmost first, after every merge; then bytes for what is no token.
fn spm_by_rescanning(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    let spm = tokenizer.spm.as_ref().unwrap();
    let mut symbols: Vec<String> = text.chars().map(String::from).collect();
    loop {
        let best = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(i, pair)| {
                let id = *tokenizer.ids.get(&pair.concat())?;
                spm.mergeable[id as usize].then_some((spm.scores[id as usize], i))
            })
            // Highest score; the first (leftmost) of equals.
            .reduce(|best, this| if this.0 > best.0 { this } else { best });
        let Some((_, at)) = best else {
            break;
        };
        let right = symbols.remove(at + 1);
        symbols[at].push_str(&right);
    }
    symbols
        .iter()
        .flat_map(|s| match tokenizer.ids.get(s) {
            Some(&id) => vec![id],
            None => s
                .bytes()
                .map(|b| tokenizer.byte_token[b as usize].unwrap())
                .collect(),
        })
        .collect()
}

#[test]
fn sentencepiece_merges_by_score_as_rescanning_does() {
    let tok = small_spm(&SPM_PIECES, true);
    let id = |piece: &str| tok.token_id(piece).unwrap();
    // "▁abc": "▁", "a", "b" and "c" tie; then "ab" and "bc" tie at -2, the leftmost wins,
    // and "abc" (-4) beats "▁a"'s chance, which is gone.
    assert_eq!(tok.encode("abc", false), [id("▁"), id("abc")]);
    // Both prefixed: each piece after a control token gets its own "▁".
    assert_eq!(
        tok.encode("ab</s>ab", true),
        [id("▁ab"), id("</s>"), id("▁ab")]
    );
    let mut state = 0x9e37_79b9_u32;
    let mut texts: Vec<String> = (0..300)
        .map(|i| {
            (0..1 + i % 40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    ['a', 'b', 'c', ' ', 'd', 'é'][state as usize % 6]
                })
                .collect()
        })
        .collect();
    texts.push("abcab ".repeat(300));
    for text in texts {
        let escaped = format!("▁{}", text.replace(' ', "▁"));
        assert_eq!(
            tok.encode(&text, false),
            spm_by_rescanning(&tok, &escaped),
            "{text:?}"
        );
        assert_eq!(tok.decode(&tok.encode(&text, false), false), text);
    }
}

#[test]
fn sentencepiece_falls_back_to_bytes_or_the_unknown_token() {
    let with_bytes = small_spm(&SPM_PIECES, true);
    let e_acute = ["<0xC3>", "<0xA9>"].map(|b| with_bytes.token_id(b).unwrap());
    let a = with_bytes.token_id("a").unwrap();
    assert_eq!(with_bytes.encode("é", false)[1..], e_acute);
    assert_eq!(with_bytes.decode(&e_acute, false), "é");
    let mut stream = Utf8Stream::default();
    let mut bytes = Vec::new();
    with_bytes.piece(e_acute[0], false, &mut bytes);
    assert_eq!(stream.push(&bytes), "");
    bytes.clear();
    with_bytes.piece(e_acute[1], false, &mut bytes);
    assert_eq!(stream.push(&bytes), "é");
    // No byte tokens: one unknown token for the character.
    let without = small_spm(&SPM_PIECES, false);
    let ids = without.encode("aéa", false);
    assert_eq!(ids[1..], [0, a]);
    assert_eq!(without.decode(&ids, false), "a<unk>a");
    assert_eq!(without.decode(&ids, true), "aa");
}

#[test]
fn sentencepiece_decoding_drops_only_the_prefix_space() {
    let tok = small_spm(&SPM_PIECES, true);
    let space_a = tok.token_id("▁a").unwrap();
    let bos = tok.bos().unwrap();
    // The first token's space is the prefix's; later ones, and piece by piece, are text.
    assert_eq!(tok.decode(&[space_a, space_a], false), "a a");
    let mut bytes = Vec::new();
    tok.piece(space_a, false, &mut bytes);
    assert_eq!(bytes, b" a");
    // After a BOS, llama.cpp keeps the space (sentencepiece would drop it).
    assert_eq!(tok.decode(&[bos, space_a], true), " a");
    assert_eq!(tok.decode(&[bos, space_a], false), "<s> a");
    assert!(tok.encode("", true).is_empty());
    assert_eq!(tok.decode(&[], false), "");
}

/// The fixture's ids for `key` in a case.
fn fixture_ids(case: &serde_json::Value, key: &str) -> Vec<u32> {
    case[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect()
}

#[test]
fn sentencepiece_tokenizes_as_the_sentencepiece_library_does() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/spm-bpe.gguf");
    let gguf = Gguf::open(path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(tok.vocab_size(), 800);
    assert_eq!(
        (tok.bos(), tok.eos(), tok.adds_bos()),
        (Some(1), Some(2), true)
    );
    let no_prefix = Tokenizer::new_sentencepiece(SentencePieceVocabulary {
        add_space_prefix: false,
        ..SentencePieceVocabulary::from_gguf(&gguf).unwrap()
    })
    .unwrap();
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/data/spm-bpe-tokens.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    let mut fell_back = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, false);
        assert_eq!(ids, fixture_ids(case, "ids"), "{text:?}");
        assert_eq!(
            tok.encode(text, true),
            fixture_ids(case, "ids_special"),
            "{text:?} with control tokens parsed"
        );
        let plain = no_prefix.encode(text, false);
        assert_eq!(plain, fixture_ids(case, "ids_no_prefix"), "{text:?}");
        // A "▁" in the text comes back as a space, in sentencepiece as here.
        if !text.contains('▁') {
            assert_eq!(tok.decode(&ids, false), text);
            assert_eq!(no_prefix.decode(&plain, false), text);
        }
        if ids
            .iter()
            .any(|&id| tok.spm.as_ref().unwrap().byte_of[id as usize].is_some())
        {
            fell_back += 1;
        }
    }
    // Enough of the strings take the byte fallback to test it.
    assert!(fell_back >= 5, "{fell_back}");
}

#[test]
fn other_vocabulary_models_are_refused_by_name() {
    let mut writer = crate::gguf::writer::GgufWriter::new();
    writer
        .metadata("tokenizer.ggml.model", Value::String("bert".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into())]),
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bert.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    writer.write_to(&mut file).unwrap();
    let err = Tokenizer::from_gguf(&Gguf::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("bert"),
        "{err}"
    );
}
