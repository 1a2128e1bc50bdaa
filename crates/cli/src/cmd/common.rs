//! Options and helpers shared by subcommands.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use flashmoe_core::loader::{open_model, IoMode, LoadOptions};
use flashmoe_core::model::Model;

use super::out::{out, outln};

#[derive(Copy, Clone, Debug, ValueEnum, Default)]
pub enum Io {
    /// through the page cache: resident experts used in place from the mapping, the most
    /// recently used kept mapped between tokens (up to half the available memory's worth, LRU),
    /// so a warm expert costs no page-table work; others pread. Resident set bounded
    #[default]
    Cached,
    /// pread through the page cache for every expert, resident ones too: a copy per expert per
    /// token (for comparison)
    Pread,
    /// O_DIRECT reads, page cache bypassed: every expert read from disk each time it is used
    /// (cold-disk behaviour; memory bounded by K experts in flight)
    Direct,
    /// as cached, and every resident expert stays mapped after use, unbounded: the resident set
    /// grows with the experts touched, like llama.cpp's mmap
    Mapped,
}

/// `--model DIR` and how to run it: what every model command takes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory: Hugging Face or MLX checkpoint, or a flashmoe packed model
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub opts: ModelOpts,
}

/// How a model is run, apart from where it is (`chat --sessions` needs no model, so `chat`
/// takes these beside an optional `--model`).
#[derive(Args, Debug, Clone)]
pub struct ModelOpts {
    /// Routed experts per token (default: the model's own num_experts_per_tok)
    #[arg(long)]
    pub k: Option<usize>,
    /// How expert bytes are read from a packed model. The default, cached, is as fast as
    /// mapped once the experts are warm and keeps memory bounded; direct when the model is far
    /// larger than memory and the page cache would only thrash
    #[arg(long, value_enum, default_value_t = Io::Cached)]
    pub io: Io,
    /// Verify a packed model against its manifest's checksums: every dense tensor once at load
    /// and every expert as it is read (a mismatch is an error naming the tensor or expert).
    /// Models packed before dense checksums (format version 1) get their experts checked only,
    /// with a note saying so
    #[arg(long)]
    pub verify: bool,
    /// Where the forward pass runs, for every command (`run`, `chat`, `serve`, `logits`,
    /// `generate`, `bench`): auto = CUDA when built with it and a usable device is present
    /// (else the CPU, with a note if a device was found but could not be used)
    #[arg(long, value_enum, default_value_t = super::backend::BackendKind::Auto)]
    pub backend: super::backend::BackendKind,
    /// wgpu adapter to use, by its index in `flashmoe devices` (default: the first hardware
    /// GPU; with `--backend wgpu` and none, the first adapter)
    #[arg(long, value_name = "N")]
    pub gpu_adapter: Option<usize>,
    /// Exact f32 activations in every product instead of the default int8 ones: the path the
    /// golden tests hold to 1e-3 of transformers. By default, as llama.cpp does, 4- and 2-bit
    /// products quantise their input to int8 per weight group (integer dot products with the
    /// codes, the group's bias term still exact): faster on CPUs, each product off by ~1%
    /// relative; `flashmoe bench decode` measures both paths' speed and the KL divergence and
    /// top-1 agreement of int8 against exact in the same run
    #[arg(long, env = "FLASHMOE_EXACT", value_parser = clap::builder::FalseyValueParser::new(), conflicts_with = "int8_activations")]
    pub exact: bool,
    /// Int8 activations for 4- and 2-bit products: the default (see --exact); kept so that
    /// scripts naming it still run
    #[arg(long)]
    pub int8_activations: bool,
    /// GPU: VRAM for the expert cache, in GB (default: all free VRAM after the dense weights,
    /// less 2 GB)
    #[arg(long, value_name = "GB", allow_negative_numbers = true, value_parser = gb_size)]
    pub vram_cache_gb: Option<f64>,
    /// GPU: page-locked host RAM for experts between VRAM and the disk, in GB (LRU; a VRAM miss
    /// found there is one copy and no read). Default 0: only one layer's staging
    #[arg(long, value_name = "GB", default_value_t = 0.0, allow_negative_numbers = true, value_parser = gb_size)]
    pub pinned_cache_gb: f64,
    /// Prompt tokens per prefill step (default 1024). Each routed expert is read once per step
    /// for all of the step's tokens, so when experts stream from disk a longer step reads the
    /// model fewer times (faster time to first token on long prompts) for more activation
    /// memory
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub prefill_chunk: Option<u32>,
    /// Most tokens of context (prompt plus answer) a sequence may hold: the budget of the
    /// attention KV cache. Default: the model's maximum, lowered when its KV cache would not
    /// fit in half the memory available now. The memory it takes is printed at load
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub ctx_size: Option<u64>,
    #[command(flatten)]
    pub threads: Threads,
    #[command(flatten)]
    pub trace: TraceOpts,
}

/// `--trace-routing FILE` and the CPU expert cache's size and policy (issue 22).
#[derive(Args, Debug, Clone, Default)]
pub struct TraceOpts {
    /// Record every token's routed experts and router weights per MoE layer (with the
    /// shared-expert gate, position, request id and phase) to FILE, appending to a trace of the
    /// same model; analyse it with `flashmoe trace`. Runs on the CPU backend
    #[arg(long, value_name = "FILE")]
    pub trace_routing: Option<PathBuf>,
    /// With --trace-routing: also record each MoE layer's router input (f16, 2*hidden bytes per
    /// token and layer), for `flashmoe trace predict`'s linear probe and --model checks
    #[arg(long, requires = "trace_routing")]
    pub trace_hidden: bool,
    /// CPU: RAM for experts kept between tokens, in GB, in front of the expert reads (default
    /// 0: the OS page cache alone). `flashmoe trace simulate` tells what a size and policy
    /// would hit on a recorded trace
    #[arg(long, value_name = "GB", default_value_t = 0.0, value_parser = gb_size)]
    pub expert_cache_gb: f64,
    /// Replacement policy of --expert-cache-gb: lru, lfu (with aging), arc, layer-lfu (equal
    /// share per layer), static (pins the most used experts after a warm-up)
    #[arg(long, value_name = "POLICY", default_value_t = flashmoe_core::cache::DEFAULT_POLICY,
          value_parser = cache_policy)]
    pub cache_policy: flashmoe_core::cache::CachePolicy,
}

/// `--cache-policy NAME`.
pub fn cache_policy(s: &str) -> Result<flashmoe_core::cache::CachePolicy, String> {
    use flashmoe_core::cache::CachePolicy;
    CachePolicy::parse(s).ok_or_else(|| {
        let names: Vec<&str> = CachePolicy::ALL.iter().map(|p| p.name()).collect();
        format!("`{s}` is not a cache policy (one of: {})", names.join(", "))
    })
}

impl TraceOpts {
    /// The expert cache `--expert-cache-gb` asks for, if any.
    pub fn expert_cache(&self) -> Option<flashmoe_core::cache::CacheSpec> {
        (self.expert_cache_gb > 0.0).then_some(flashmoe_core::cache::CacheSpec {
            bytes: (self.expert_cache_gb * 1e9) as usize,
            policy: self.cache_policy,
            warmup_tokens: flashmoe_core::cache::DEFAULT_WARMUP_TOKENS,
        })
    }

    /// Installs the process's routing recorder for the model in `dir` when --trace-routing
    /// was given (its file is opened at the first forward pass unless [`Self::open`] is
    /// called first).
    pub fn install(&self, dir: &std::path::Path) -> Result<()> {
        let Some(path) = &self.trace_routing else {
            return Ok(());
        };
        let id = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        let rec = flashmoe_core::trace::Recorder::new(path, &id, self.trace_hidden);
        flashmoe_core::trace::install(std::sync::Arc::new(rec))?;
        Ok(())
    }

    /// Opens the installed recorder's file for `model` now, so a wrong file fails before
    /// any work.
    pub fn open(&self, model: &Model) -> Result<()> {
        if let (Some(path), Some(rec)) = (&self.trace_routing, flashmoe_core::trace::active()) {
            if let Some(note) = rec
                .open_for(model)
                .with_context(|| format!("--trace-routing {}", path.display()))?
            {
                eprintln!("note: {note}");
            }
        }
        Ok(())
    }
}

/// `--threads N`, for every command that computes.
#[derive(Args, Debug, Clone, Default)]
pub struct Threads {
    /// Compute threads (default: one per core, or RAYON_NUM_THREADS when set)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Option<u32>,
}

impl Threads {
    /// Sizes the global compute pool; call before any parallel work.
    pub fn apply(&self) -> Result<()> {
        if let Some(n) = self.threads {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n as usize)
                .build_global()
                .with_context(|| format!("--threads {n}: setting up the thread pool"))?;
        }
        Ok(())
    }
}

/// A size in GB for `--vram-cache-gb` / `--pinned-cache-gb`. The error quotes what was typed:
/// an f64 printed back would spell `1e308` with 309 digits.
fn gb_size(s: &str) -> Result<f64, String> {
    // 1 PB: far beyond any machine, small enough that GB -> bytes cannot overflow.
    const MAX_GB: f64 = 1e6;
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=MAX_GB).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a size in GB (a number from 0 to {MAX_GB:.0})"
        )),
    }
}

impl ModelOpts {
    /// Prompt tokens per prefill step: `--prefill-chunk`, else the session's default.
    pub fn prefill_step(&self) -> usize {
        self.prefill_chunk
            .map_or(flashmoe_core::session::DEFAULT_PREFILL_CHUNK, |c| {
                c as usize
            })
    }

    /// `logits` and `generate` are the commands outputs are checked with against a reference
    /// (transformers' logits, its greedy ids): they take exact f32 activations unless
    /// `--int8-activations` is named, where `run`, `chat`, `serve` and `bench` default to int8.
    pub fn verification_activations(&mut self) {
        self.exact = !self.int8_activations;
    }

    /// Sets the process-wide switches these arguments choose (int8 activations, the thread
    /// pool). `load` and `engine` call it; a subcommand that builds its own loader from
    /// `options` calls it itself.
    pub fn apply_kernel_switches(&self) -> Result<()> {
        set_exact_activations(self.exact);
        self.threads.apply()
    }

    /// `--vram-cache-gb` and `--pinned-cache-gb` in bytes (checked by the parser).
    pub fn gpu(&self) -> super::backend::GpuOptions {
        super::backend::GpuOptions {
            vram_cache_bytes: self.vram_cache_gb.map(|g| (g * 1e9) as usize),
            pinned_cache_bytes: (self.pinned_cache_gb * 1e9) as usize,
        }
    }

    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            io: match self.io {
                Io::Cached => IoMode::Cached,
                Io::Pread => IoMode::Pread,
                Io::Direct => IoMode::Direct,
                Io::Mapped => IoMode::Mapped,
            },
            verify: self.verify,
            top_k: self.k,
            expert_cache: self.trace.expert_cache(),
        }
    }

    /// `--ctx-size` as the runtime takes it.
    pub fn ctx_size(&self) -> Option<usize> {
        self.ctx_size
            .map(|c| usize::try_from(c).unwrap_or(usize::MAX))
    }

    /// The runtime's load options (backend, prefill step, context budget).
    pub fn runtime_options(&self) -> Result<flashmoe_runtime::LoadOptions> {
        Ok(flashmoe_runtime::LoadOptions {
            core: self.options(),
            backend: super::backend::engine_backend(self)?,
            prefill_chunk: self.prefill_chunk.map(|c| c as usize),
            ctx_size: self.ctx_size(),
            ..Default::default()
        })
    }
}

impl ModelArgs {
    /// Says on stderr what `--verify` cannot check in this model, if anything.
    fn note_unverifiable(&self) {
        if self.opts.verify {
            if let Some(note) = flashmoe_core::packed::verify_note(&self.model) {
                eprintln!("note: {note}");
            }
        }
    }

    /// The model alone (token-level commands), its context budget applied and printed.
    pub fn load(&self) -> Result<Model> {
        super::backend::check_trace_backend(&self.opts)?;
        self.opts.apply_kernel_switches()?;
        self.note_unverifiable();
        let mut model = open_model(&self.model, &self.opts.options())
            .with_context(|| format!("loading model from {}", self.model.display()))?;
        let plan = flashmoe_runtime::context::limit(&mut model.cfg, self.opts.ctx_size())?;
        eprintln!("{plan}");
        self.opts.trace.install(&self.model)?;
        self.opts.trace.open(&model)?;
        Ok(model)
    }

    /// The generation engine (model + tokenizer + chat template) for text front ends; its
    /// context budget is printed.
    pub fn engine(&self) -> Result<flashmoe_runtime::Engine> {
        self.opts.apply_kernel_switches()?;
        self.note_unverifiable();
        let engine = flashmoe_runtime::Engine::open(&self.model, self.opts.runtime_options()?)
            .with_context(|| format!("loading model from {}", self.model.display()))?;
        eprintln!("{}", engine.context_plan());
        self.opts.trace.install(&self.model)?;
        self.opts.trace.open(engine.model())?;
        Ok(engine)
    }
}

/// `--exact`: the exact f32 activation path; otherwise int8 activations in 4- and 2-bit
/// products (the default).
pub fn set_exact_activations(exact: bool) {
    use flashmoe_core::kernels::{set_act_quant, ActQuant};
    set_act_quant(if exact {
        ActQuant::Exact
    } else {
        ActQuant::Int8
    });
}

/// Feeds `ids` to `runner` in steps of `step` tokens (as a session prefills) and returns the
/// logits `want` asks for: every position's, or the last one's.
pub fn prefill(
    runner: &mut dyn flashmoe_core::session::SeqBackend,
    ids: &[u32],
    step: usize,
    want: flashmoe_core::model::Logits,
    stats: &mut flashmoe_core::model::ForwardStats,
) -> Result<Vec<f32>> {
    use flashmoe_core::model::Logits;
    let mut out = Vec::new();
    for part in ids.chunks(step.max(1)) {
        let l = runner.forward(part, want, stats)?;
        match want {
            Logits::All => out.extend_from_slice(&l),
            Logits::Last => out = l,
        }
    }
    Ok(out)
}

/// Prints generated ids as `1,2,3` and a newline, each id as soon as it is chosen: a closed
/// stdout then stops the generation at the next token instead of after all of them.
#[derive(Default)]
pub struct IdPrinter {
    printed: usize,
}

impl IdPrinter {
    pub fn push(&mut self, id: u32) -> Result<()> {
        let sep = if self.printed == 0 { "" } else { "," };
        self.printed += 1;
        out!("{sep}{id}")
    }

    pub fn finish(self) -> Result<()> {
        outln!()
    }
}

/// Parses `1,2,3` (spaces allowed, one trailing comma tolerated) into token ids. An empty
/// entry inside the list (`1,,2`) is refused: it is more likely a lost id than a separator.
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    if s.trim().is_empty() {
        bail!("--ids is empty: give at least one token id, e.g. --ids 1,2,3");
    }
    let body = s.trim().strip_suffix(',').unwrap_or(s.trim());
    body.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, p)| {
            if p.is_empty() {
                bail!(
                    "--ids: entry {} is empty (`{s}`): give comma-separated token ids",
                    i + 1
                );
            }
            p.parse::<u32>()
                .with_context(|| format!("--ids: `{p}` is not a token id (non-negative integer)"))
        })
        .collect()
}

/// Refuses `--tokens` that cannot fit after `prompt` ids in the model's context, before any
/// work: otherwise the limit is hit only after every token that fits has been computed, and
/// the ones generated so far are lost with the error. Same rule as the engine's `max_tokens`.
pub fn check_tokens_fit(model: &Model, prompt: usize, tokens: usize) -> Result<()> {
    let context = model.cfg.max_position_embeddings;
    if prompt + tokens > context {
        bail!(
            "--tokens {tokens} plus the {prompt} prompt ids exceed the model's context of \
             {context} tokens (at most {} can be generated)",
            context.saturating_sub(prompt)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_ids;

    #[test]
    fn ids_parse_and_refuse_empty_entries() {
        assert_eq!(parse_ids("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_ids("7,").unwrap(), vec![7]);
        assert!(parse_ids("1,,2")
            .unwrap_err()
            .to_string()
            .contains("entry 2 is empty"));
        assert!(parse_ids(" ").is_err());
        assert!(parse_ids(",").is_err());
        assert!(parse_ids("1,x").is_err());
    }
}
