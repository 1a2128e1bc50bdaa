//! The demo's embedded tokenizer: a word-level vocabulary of common English words, so that a
//! random model's output reads as (random) words rather than random bytes.
use serde_json::{json, Map, Value};

const WORDS: &str = "the of and to in is that it was for on are as with his they at be this from \
have or by one had not but what all were when we there can an your which their said if do will \
each about how up out them then she many some so these would other into has more her two like him \
see time could no make than first been its who now people my made over did down only way find use \
may water long little very after words called just where most know get through back much go good \
new write our me man too any day same right look think also around another came come work three \
word must because does part even place well such here take why things help put years different \
away again off went old number great tell men say small every found still between name should home \
big give air line set own under read last never us left end along while might next sound below saw \
something thought both few those always looked show large often together asked house world going \
want school important until form food keep children feet land side without boy once animals life \
enough took sometimes four head above kind began almost live page got earth need far hand high year \
mother light parts country father let night following picture being study second eyes soon times \
story boys since white days ever paper hard near sentence better best across during today others \
however sure means knew its try told young miles sun ways thing whole hear example heard several \
change answer room sea against top turned learn point city play toward five using himself usually \
model expert memory disk token layer stream fast engine river mountain light quiet morning . , ! ?";

/// `tokenizer.json` text: specials first (ids 0-3), then the words.
pub fn tokenizer_json() -> String {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"];
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
        added.push(
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    for w in WORDS.split_whitespace() {
        if !vocab.contains_key(w) {
            let id = vocab.len();
            vocab.insert(w.to_string(), json!(id));
        }
    }
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": Value::Object(vocab), "unk_token": "<unk>"}
    });
    tok.to_string()
}
