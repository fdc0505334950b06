//! The tokenizer on a small hand-made vocabulary, and on SmolLM2's against Hugging Face's
//! `tokenizers` (the fixture `llm/tests/data/smollm2-tokens.json`, made by
//! `llm/tools/tokenizer_reference.py`).

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
