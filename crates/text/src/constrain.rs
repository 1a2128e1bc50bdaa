//! Constrained decoding: a grammar (JSON Schema or a Lark grammar) turned into a per-step mask
//! over the vocabulary, so that only tokens keeping the output inside the grammar can be sampled.
//!
//! The grammar engine is `llguidance` (the structured-output engine of several large servers):
//! JSON Schema, regular expressions and its Lark dialect, with a token-trie mask computed in
//! tens of microseconds. This module owns only the glue: the token trie built from the model's
//! `tokenizer.json` (llguidance's own reader of that file, so byte-level BPE pieces, byte
//! fallback and special tokens are mapped as llguidance expects), flashmoe's JSON layout
//! defaults, and applying a mask to a logits row.
//!
//! The end-of-sequence ids are the grammar's EOS: the mask allows them only where the grammar
//! accepts, so a generation that stops on them stops on a complete output.
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Result, TextError};
use crate::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON Schema (`{"type": "object"}` is OpenAI's JSON mode). Unless the schema says
    /// otherwise in llguidance's `x-guidance` key, values are laid out as Python's
    /// `json.dumps` does: `", "` between items, `": "` after keys, no other whitespace.
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect (`start: ...`; `%json {...}` embeds a schema).
    Lark(String),
}

impl GrammarSpec {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    pub fn json_object() -> Self {
        GrammarSpec::JsonSchema(serde_json::json!({"type": "object"}))
    }
}

/// flashmoe's JSON layout: what models are trained on (chat templates render arguments with
/// `tojson`), and bounded, so a weak model cannot pad its output with whitespace forever.
pub fn json_layout() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// `schema` with [`json_layout`] added as its `x-guidance`, unless it has one (the client's
/// choice wins) or is not an object (`true`).
pub fn with_json_layout(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Value::Object(m) = &mut s {
        m.entry("x-guidance").or_insert_with(json_layout);
    }
    s
}

/// The token trie llguidance masks over; tokenization of text it needs (rare: forced
/// literals) is the trie's greedy one, which only has to produce valid tokens.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// Compiles grammars for one model's vocabulary. Building it reads the whole vocabulary
/// (about a second for 250k tokens), so an engine makes one, on the first constrained request.
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab", &self.vocab)
            .finish()
    }
}

fn grammar_err(op: &'static str, e: impl std::fmt::Display) -> TextError {
    TextError::Grammar {
        op,
        msg: e.to_string(),
    }
}

impl GrammarCompiler {
    /// The trie of `tok`'s vocabulary, padded to `model_vocab` ids (ids with no token are
    /// never allowed), ending on `stop_ids`.
    pub fn new(tok: &Tokenizer, model_vocab: usize, stop_ids: &[u32]) -> Result<Self> {
        let json = tok.to_json()?;
        // llguidance's reader asserts on some malformed vocabularies; a panic there must not
        // take a server down, so it becomes an error naming the file.
        let bytes = std::panic::catch_unwind(|| {
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|_| Err("the vocabulary could not be read".into()))
        .map_err(|e| {
            grammar_err(
                "reading the vocabulary",
                format!("{}: {e}", tok.path().display()),
            )
        })?;
        let n = bytes.len().max(model_vocab);
        let words: Vec<Vec<u8>> = (0..n)
            .map(|id| match bytes.get(id) {
                Some(b) if !b.is_empty() => b.clone(),
                // Padding and holes: a special-token name no grammar refers to.
                _ => {
                    let mut name = format!(".<[{id}]>").into_bytes();
                    name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
                    name
                }
            })
            .collect();
        let stops: Vec<u32> = stop_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < n)
            .collect();
        let Some(&first) = stops.first() else {
            return Err(grammar_err(
                "building the token trie",
                "the model has no end-of-sequence id, so no grammar could end",
            ));
        };
        let info = TokRxInfo::new(n as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| grammar_err("building the token trie", e))?;
        factory.quiet();
        Ok(GrammarCompiler { factory, vocab: n })
    }

    /// Ids the trie knows (the model's vocabulary, or the tokenizer's when larger).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Whether `name` (such as `</tool_call>`) is one special token, so a Lark grammar can
    /// refer to it as `<name>`.
    pub fn is_special_token(&self, name: &str) -> bool {
        let mut key = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        key.extend_from_slice(name.as_bytes());
        self.factory
            .tok_env()
            .tok_trie()
            .token_id_at_bytes(&key)
            .is_some()
    }

    /// A fresh matcher for one generation. Errors name what is wrong with the grammar.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(with_json_layout(s)),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| grammar_err("compiling the grammar", e))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(grammar_err("compiling the grammar", e));
        }
        let eos = self.factory.tok_env().tok_trie().eos_tokens().to_vec();
        Ok(Constraint { matcher, eos })
    }
}

/// One generation's grammar state: mask the logits, then advance with the sampled token.
pub struct Constraint {
    matcher: Matcher,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// The tokens allowed next; the end-of-sequence ids are among them only where the grammar
    /// accepts (and alone once it is complete). `allow_eos: false` takes them out (a caller
    /// that will not stop on them).
    pub fn allowed(&mut self, allow_eos: bool) -> Result<SimpleVob> {
        let mut mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| grammar_err("computing the token mask", e))?;
        if !allow_eos {
            for &e in &self.eos {
                mask.disallow_token(e);
            }
        }
        Ok(mask)
    }

    /// Sets every logit the grammar forbids next to minus infinity. Returns how many ids stay
    /// allowed (0: the grammar is complete and only end-of-sequence could follow, which
    /// `allow_eos: false` removed).
    pub fn apply(&mut self, logits: &mut [f32], allow_eos: bool) -> Result<usize> {
        let mask = self.allowed(allow_eos)?;
        Ok(mask_logits(&mask, logits))
    }

    /// Whether `token` may come next, without computing the whole mask (a walk of the token's
    /// bytes); an allowed token other than end-of-sequence is consumed at once.
    /// End-of-sequence is allowed where the grammar accepts, unless `allow_eos` is false.
    pub fn try_accept(&mut self, token: u32, allow_eos: bool) -> Result<bool> {
        if self.eos.contains(&token) {
            return Ok(allow_eos && self.is_accepting());
        }
        let n = self
            .matcher
            .try_consume_tokens(&[token])
            .map_err(|e| grammar_err("checking a token", e))?;
        Ok(n == 1)
    }

    /// Moves the grammar past a sampled token (which the mask allowed).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| grammar_err("advancing the grammar", e))
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Whether the grammar admits nothing more (complete, or failed).
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Sets the logits of ids outside `mask` to minus infinity, a 32-id word at a time; ids beyond
/// the mask are outside the vocabulary the grammar knows and are forbidden too. Returns the
/// number of allowed ids.
pub fn mask_logits(mask: &SimpleVob, logits: &mut [f32]) -> usize {
    let words = mask.as_slice();
    let mut allowed = 0usize;
    for (i, chunk) in logits.chunks_mut(32).enumerate() {
        let w = words.get(i).copied().unwrap_or(0);
        if w == u32::MAX && chunk.len() == 32 {
            allowed += 32;
            continue;
        }
        for (bit, l) in chunk.iter_mut().enumerate() {
            if w & (1 << bit) == 0 {
                *l = f32::NEG_INFINITY;
            } else {
                allowed += 1;
            }
        }
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_sets_forbidden_logits_to_minus_infinity() {
        let mut mask = SimpleVob::alloc(70);
        for id in [0, 31, 32, 64, 69] {
            mask.allow_token(id);
        }
        let mut logits = vec![1.0f32; 70];
        assert_eq!(mask_logits(&mask, &mut logits), 5);
        for (id, l) in logits.iter().enumerate() {
            let allowed = [0, 31, 32, 64, 69].contains(&id);
            assert_eq!(*l == 1.0, allowed, "id {id}");
        }
        // Ids beyond the mask (a vocabulary larger than the trie's) are forbidden.
        let mut longer = vec![1.0f32; 100];
        assert_eq!(mask_logits(&mask, &mut longer), 5);
        assert!(longer[70..].iter().all(|l| *l == f32::NEG_INFINITY));
    }
}
