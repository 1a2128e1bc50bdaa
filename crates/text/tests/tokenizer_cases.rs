//! Tokenizer against `shared/tokenizer/qwen3.5/tokenizer_cases.json` (ids agreed by tiktoken
//! and HF tokenizers), plus streaming decode equal to whole decode.

mod common;

use flashmoe_text::Tokenizer;

fn load() -> Option<(Tokenizer, Vec<serde_json::Value>)> {
    let dir = common::qwen35_dir()?;
    let tok = Tokenizer::from_dir(&dir).expect("loading tokenizer");
    let cases = common::read_case_file("tokenizer_cases.json")?;
    let cases = cases.as_array().expect("cases array").clone();
    Some((tok, cases))
}

fn ids_of(case: &serde_json::Value) -> Vec<u32> {
    case["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn encode_and_decode_match_reference() {
    let Some((tok, cases)) = load() else { return };
    assert!(!cases.is_empty());
    for case in &cases {
        let text = case["text"].as_str().expect("text");
        let want = ids_of(case);
        assert_eq!(tok.encode(text).unwrap(), want, "encode {text:?}");
        let decoded = case["decoded"].as_str().expect("decoded");
        assert_eq!(tok.decode(&want).unwrap(), decoded, "decode {text:?}");
    }
}

#[test]
fn stream_decode_equals_full_decode() {
    let Some((tok, cases)) = load() else { return };
    for case in &cases {
        let ids = ids_of(case);
        let mut dec = tok.stream_decoder();
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = dec.push(id).unwrap() {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "half a character emitted for {ids:?}"
                );
                out.push_str(&piece);
            }
        }
        if let Some(rest) = dec.flush().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, tok.decode(&ids).unwrap(), "stream decode of {ids:?}");
    }
}

#[test]
fn stream_decode_holds_back_split_character() {
    let Some((tok, _)) = load() else { return };
    // A 4-byte emoji is usually split over several byte-level tokens.
    let ids = tok.encode("🌊").unwrap();
    let mut dec = tok.stream_decoder();
    let pieces: Vec<_> = ids.iter().filter_map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(pieces.concat(), "🌊");
    assert!(dec.flush().unwrap().is_none());
}

#[test]
fn special_token_ids() {
    let Some((tok, _)) = load() else { return };
    assert_eq!(tok.token_id("<|im_start|>"), Some(248045));
    assert_eq!(tok.token_id("<|im_end|>"), Some(248046));
    assert_eq!(tok.token_id("<|endoftext|>"), Some(248044));
    assert_eq!(tok.token_id("<think>"), Some(248068));
    assert!(tok.vocab_size() >= 248070);
}

#[test]
fn eos_ids_from_model_dir_and_vocab() {
    let Some((tok, _)) = load() else { return };
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let model = shared.join("golden/tiny-a/hf-bf16");
    let ids = flashmoe_text::eos_token_ids(&model, Some(&tok)).unwrap();
    // The tiny fixture's config says 999; the chat terminators come from the vocabulary.
    assert_eq!(ids, [999, 248046, 248044]);
}
