//! [`Engine`]: one loaded model with its tokenizer, chat template, default sampling settings,
//! stop ids and the one [`Session`] whose snapshots give prefix reuse across requests.
//!
//! Generations run one at a time (`&mut self`); a server serialises requests in front of it.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flashmoe_core::loader::{open_model, LoadOptions as CoreLoadOptions};
use flashmoe_core::model::Model;
use flashmoe_core::session::{BackendFactory, Session};
use flashmoe_text::{ChatTemplate, GrammarCompiler, SamplingParams, TextError, Tokenizer};

use crate::context::ContextPlan;
use crate::error::{Result, RuntimeError};
use crate::prompt::{self, PreparedPrompt};
use crate::request::{GenerationRequest, PromptInput, ToolChoice};

/// How to open a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// I/O mode, checksum verification and routed experts per token.
    pub core: CoreLoadOptions,
    /// Saved states kept for prefix reuse (each holds a full KV/recurrent state copy).
    pub max_snapshots: usize,
    /// Tokens per prefill forward call; `None` keeps the session's default.
    pub prefill_chunk: Option<usize>,
    /// The name the model answers to (OpenAI `model`); default: the directory's name.
    pub model_name: Option<String>,
    /// Where the forward pass runs; `None` is the CPU.
    pub backend: Option<BackendFactory>,
    /// Most tokens of context (`--ctx-size`); `None`: the model's maximum, lowered to fit the
    /// memory available (see [`crate::context::plan`]).
    pub ctx_size: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            core: CoreLoadOptions::default(),
            max_snapshots: 8,
            prefill_chunk: None,
            model_name: None,
            backend: None,
            ctx_size: None,
        }
    }
}

pub struct Engine {
    /// The live sequence state and the prefix-reuse snapshots; owns (an Arc of) the model.
    pub(crate) session: Session,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) defaults: SamplingParams,
    pub(crate) stop_ids: Vec<u32>,
    name: String,
    pub(crate) dir: PathBuf,
    context: ContextPlan,
    /// Told (prompt tokens ready, prompt tokens) after each prefill step; see
    /// [`Engine::set_prefill_progress`].
    pub(crate) prefill_progress: Option<PrefillProgress>,
    /// The vocabulary's token trie for grammars, built on the first constrained request.
    grammar: Option<Arc<GrammarCompiler>>,
}

/// A prefill progress callback: (prompt tokens ready, prompt tokens).
pub type PrefillProgress = Box<dyn FnMut(usize, usize) + Send>;

#[allow(dead_code)]
fn assert_thread_safety() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    sync::<Model>();
    send::<Session>();
    send::<Tokenizer>();
    send::<ChatTemplate>();
}

impl Engine {
    /// Loads the model, tokenizer, chat template (optional: plain-text prompts still work),
    /// `generation_config.json` defaults and the stop ids from `dir`.
    pub fn open(dir: &Path, opts: LoadOptions) -> Result<Engine> {
        // `generate` checks for faults after every forward pass, so a model file truncated
        // under a generation can become an error instead of a SIGBUS (see `mapguard`).
        flashmoe_core::mapguard::recover_faults();
        let mut model = open_model(dir, &opts.core)?;
        let context = crate::context::limit(&mut model.cfg, opts.ctx_size)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = match ChatTemplate::from_dir(dir) {
            Ok(t) => Some(t),
            Err(TextError::TemplateMissing(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let defaults = SamplingParams::from_generation_config(dir)?;
        let stop_ids = stop_ids(dir, &model, &tokenizer)?;
        let name = opts.model_name.clone().unwrap_or_else(|| {
            dir.canonicalize()
                .ok()
                .as_deref()
                .unwrap_or(dir)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let model = Arc::new(model);
        let mut session = match &opts.backend {
            Some(f) => Session::with_backend(model.clone(), f.build(model)?),
            None => Session::new(model),
        };
        session.max_snapshots = opts.max_snapshots;
        if let Some(c) = opts.prefill_chunk {
            session.prefill_chunk = c.max(1);
        }
        Ok(Engine {
            session,
            tokenizer,
            template,
            defaults,
            stop_ids,
            name,
            dir: dir.to_path_buf(),
            context,
            prefill_progress: None,
            grammar: None,
        })
    }

    pub fn model(&self) -> &Model {
        &self.session.model
    }

    /// Where the forward pass runs ("cpu", "cuda").
    pub fn backend_name(&self) -> &'static str {
        self.session.backend_name()
    }

    /// Time per layer and phase accumulated by every forward call so far.
    pub fn forward_stats(&self) -> &flashmoe_core::model::ForwardStats {
        &self.session.stats
    }

    /// The name the model answers to.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// The context budget chosen at load, with the memory it takes.
    pub fn context_plan(&self) -> &ContextPlan {
        &self.context
    }

    /// Context length in tokens (prompt plus completion).
    pub fn context_len(&self) -> usize {
        self.model().cfg.max_position_embeddings
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Sampling settings used where a request sets none.
    pub fn default_sampling(&self) -> &SamplingParams {
        &self.defaults
    }

    /// Ids that end a generation (the model's eos ids, `<|im_end|>`, `<|endoftext|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The prompt text the model would see for this request (chat template and tool choice
    /// applied). Runs nothing.
    pub fn render(&self, prompt: &PromptInput, choice: &ToolChoice) -> Result<String> {
        prompt::render_text(self.template.as_ref(), &self.name, prompt, choice)
    }

    /// Tokenizes the request's prompt and checks it against the vocabulary and the context,
    /// without running the model. Returns (prompt, tokens that may be generated).
    pub fn prepare(&self, req: &GenerationRequest) -> Result<(PreparedPrompt, usize)> {
        let p = prompt::prepare(
            &self.tokenizer,
            self.template.as_ref(),
            &self.name,
            &req.prompt,
            &req.tool_choice,
        )?;
        let vocab = self.model().cfg.vocab_size;
        if let Some(&id) = p.ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RuntimeError::InvalidPrompt(format!(
                "token id {id} is outside the model's vocabulary of {vocab}"
            )));
        }
        let context = self.context_len();
        let n = p.ids.len();
        if n >= context {
            return Err(RuntimeError::PromptTooLong {
                prompt_tokens: n,
                context,
            });
        }
        let max_new = match req.max_tokens {
            Some(m) if n + m > context && req.clamp_max_tokens => context - n,
            Some(m) if n + m > context => {
                return Err(RuntimeError::MaxTokensTooLarge {
                    max_tokens: m,
                    prompt_tokens: n,
                    context,
                })
            }
            Some(m) => m,
            None => context - n,
        };
        Ok((p, max_new))
    }

    /// The grammar compiler for this model's vocabulary (built once, on first use: reading a
    /// 250k vocabulary takes about a second).
    pub fn grammar_compiler(&mut self) -> Result<Arc<GrammarCompiler>> {
        if let Some(g) = &self.grammar {
            return Ok(g.clone());
        }
        let vocab = self.model().cfg.vocab_size;
        let g = Arc::new(GrammarCompiler::new(
            &self.tokenizer,
            vocab,
            &self.stop_ids,
        )?);
        self.grammar = Some(g.clone());
        Ok(g)
    }

    /// Calls `f(ready, total)` after each prefill step of every later generation whose prompt
    /// is not all reused (a resumed chat's history can take minutes); `None` stops it.
    pub fn set_prefill_progress(&mut self, f: Option<PrefillProgress>) {
        self.prefill_progress = f;
    }

    /// Forgets the live state and every snapshot's use (the next prompt prefills in full).
    pub fn reset(&mut self) {
        self.session.reset();
    }
}

/// Stop ids: the config's eos ids, `generation_config.json`'s `eos_token_id`, and the chat
/// end markers the tokenizer knows, all within the model's vocabulary.
/// Stop ids: the model directory's eos ids and chat stop tokens (the text crate's discovery)
/// plus the config's eos ids the loader already parsed (a packed dir has no config.json),
/// kept to ids the model can emit.
fn stop_ids(dir: &Path, model: &Model, tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = flashmoe_text::eos_token_ids(dir, Some(tok))?;
    ids.extend(&model.cfg.eos_token_ids);
    ids.retain(|&id| (id as usize) < model.cfg.vocab_size);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
