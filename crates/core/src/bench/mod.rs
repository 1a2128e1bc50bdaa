//! `flashmoe bench`: measures the engine and, in the same run, the machine limits it is
//! judged against (memory read bandwidth, O_DIRECT disk bandwidth), and reports every figure
//! beside its limit and their ratio (design.md: "Everything the engine does is judged against
//! that bound, measured on the same machine in the same run").
//!
//! Report shape: one JSON object with a section per benchmark. A figure `X` with a limit is
//! three fields: `X_<unit>`, `X_limit_<unit>` and `X_ratio = X / X_limit`. So for a rate
//! (GB/s, tok/s) the ratio is the fraction of the limit reached (higher is better, at most
//! about 1), and for a time per token it is how many times the bound it took (lower is better,
//! at least about 1). The targets read directly off the ratios.
//!
//! Owns measurement and reporting only: it drives the model through its public API and never
//! changes how the model computes, except through [`crate::model::ForwardOptions`].
pub mod accuracy;
mod io;
mod kernels;
mod run;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::loader::{open_model, IoMode, LoadOptions};
use crate::model::{Ffn, Mixer, Model};
use crate::packed;
use crate::weights::Linear;

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Kernels,
    Io,
    Moe,
    Decode,
    Prefill,
}

impl Which {
    pub const ALL: [Which; 5] = [
        Which::Kernels,
        Which::Io,
        Which::Moe,
        Which::Decode,
        Which::Prefill,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Which::Kernels => "kernels",
            Which::Io => "io",
            Which::Moe => "moe",
            Which::Decode => "decode",
            Which::Prefill => "prefill",
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: PathBuf,
    /// Routed experts per token (None: the model's own).
    pub k: Option<usize>,
    /// Decode steps per decode measurement (and tokens for the MoE-only benchmark).
    pub tokens: usize,
    /// Prompt length of the prefill benchmark (the figure is 2,000).
    pub prompt_tokens: usize,
    /// Tokens per prefill forward call (a session's default unless told otherwise).
    pub prefill_chunk: usize,
    /// Weight bytes each kernel measurement streams per pass (beyond every cache).
    pub kernel_mb: usize,
    /// Bytes read per I/O measurement.
    pub io_mb: usize,
    /// Run the cold (`--io direct`) variants where the model is packed.
    pub cold: bool,
    /// Run the same-run baselines (serial experts, recurrent GDN, next-layer prefetch).
    pub compare: bool,
}

impl BenchOptions {
    pub fn new(model: PathBuf) -> Self {
        BenchOptions {
            model,
            k: None,
            tokens: 8,
            prompt_tokens: 2000,
            prefill_chunk: crate::session::DEFAULT_PREFILL_CHUNK,
            kernel_mb: 256,
            io_mb: 1024,
            cold: true,
            compare: true,
        }
    }
}

/// One JSON section under construction.
#[derive(Default)]
pub(crate) struct Section(Map<String, Value>);

/// Rounds to 4 significant digits so reports stay readable (the bench's JSON and the rows
/// `bench --record` derives from it).
pub fn round4(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let mag = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * mag).round() / mag
}

impl Section {
    pub(crate) fn val(&mut self, key: &str, v: impl Into<Value>) {
        self.0.insert(key.to_string(), v.into());
    }
    pub(crate) fn num(&mut self, key: &str, v: f64) {
        let v = round4(v);
        self.0.insert(
            key.to_string(),
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        );
    }
    /// `name_unit`, `name_limit_unit` and `name_ratio = value / limit`.
    pub(crate) fn fig(&mut self, name: &str, unit: &str, value: f64, limit: f64) {
        self.num(&format!("{name}_{unit}"), value);
        self.num(&format!("{name}_limit_{unit}"), limit);
        self.num(&format!("{name}_ratio"), value / limit);
    }
    pub(crate) fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

/// Machine limits measured once per run and shared by the sections.
pub(crate) struct Limits {
    /// Memory read bandwidth, GB/s, all threads.
    pub mem_gbs: f64,
    /// Expert-sized O_DIRECT reads at K in flight on a layer file, GB/s (buffered when the
    /// filesystem refuses O_DIRECT; `disk_direct` says which).
    pub disk_gbs: f64,
    pub disk_direct: bool,
    /// Resident bytes of this process before the model was loaded.
    pub base_rss: u64,
}

/// What the report needs to know about the model besides the `Model` itself.
pub(crate) struct ModelInfo {
    pub packed: bool,
    /// A file of expert bytes for disk probes: a packed layer file or the largest checkpoint file.
    pub probe_file: PathBuf,
    /// Layer files of a packed model (for the I/O benchmark).
    pub expert_files: Vec<PathBuf>,
    /// Every file a token reads (experts and dense weights: a decode touches a new embedding
    /// row per token), read once before a warm measurement.
    pub warm_files: Vec<PathBuf>,
    pub bits: u32,
    pub k: usize,
    pub expert_bytes: usize,
    /// Read size of one expert (rounded up to 4096 for O_DIRECT).
    pub read_bytes: usize,
}

/// Runs the chosen benchmarks and returns the report. `say` receives progress lines.
pub fn run_bench(opts: &BenchOptions, which: &[Which], say: &dyn Fn(&str)) -> Result<Value> {
    let threads = rayon::current_num_threads();
    let base_rss = rss_bytes();
    let load = |io: IoMode| {
        open_model(
            &opts.model,
            &LoadOptions {
                io,
                verify: false,
                top_k: opts.k,
                expert_cache: None,
            },
        )
    };
    say(&format!("loading {}", opts.model.display()));
    let mut model = load(IoMode::Cached)?;
    let info = model_info(&opts.model, &model)?;

    say("probing memory read bandwidth");
    let mem_gbs = crate::probe::memory_read_bandwidth(512 << 20, threads);
    let needs_disk = which
        .iter()
        .any(|w| matches!(w, Which::Io | Which::Moe | Which::Decode | Which::Prefill));
    let (disk_gbs, disk_direct) = if needs_disk {
        say("probing disk read bandwidth (O_DIRECT, expert-sized reads, K in flight)");
        io::disk_probe(&info, opts.io_mb.min(1024) << 20)
    } else {
        (f64::NAN, false)
    };
    let limits = Limits {
        mem_gbs,
        disk_gbs,
        disk_direct,
        base_rss,
    };

    let mut root = Map::new();
    let mut m = Section::default();
    m.val("threads", threads);
    m.val("isa", crate::kernels::isa_name());
    m.num("mem_read_bw_gbs", mem_gbs);
    if needs_disk {
        m.num("disk_read_bw_gbs", disk_gbs);
        m.val("disk_read_direct", disk_direct);
    }
    m.num("mem_available_gb", mem_available() as f64 / 1e9);
    root.insert("machine".into(), m.into_value());

    let mut mi = Section::default();
    mi.val("dir", opts.model.display().to_string());
    mi.val("arch", format!("{:?}", model.cfg.arch));
    mi.val("layers", model.cfg.num_layers);
    mi.val("hidden", model.cfg.hidden_size);
    mi.val("experts", model.cfg.num_experts);
    mi.val("k", info.k);
    mi.val("bits", info.bits);
    mi.val("packed", info.packed);
    mi.val("expert_bytes", info.expert_bytes);
    mi.num(
        "dense_bytes_per_token_gb",
        dense_bytes_per_token(&model) as f64 / 1e9,
    );
    mi.num(
        "dense_bytes_total_gb",
        dense_bytes_total(&model) as f64 / 1e9,
    );
    mi.val("experts_source", model.experts.describe());
    root.insert("model".into(), mi.into_value());

    let mut warm_tpt_ms = None;
    for &w in which {
        say(&format!("bench {}", w.name()));
        let v = match w {
            Which::Kernels => kernels::bench(&model, &limits, opts),
            Which::Io => io::bench(&model, &info, &limits, opts, &load, say)?,
            Which::Moe => run::moe(&mut model, &info, &limits, opts, &load)?,
            Which::Decode => {
                let (v, tpt) = run::decode(&mut model, &info, &limits, opts, &load, say)?;
                warm_tpt_ms = Some(tpt);
                v
            }
            Which::Prefill => {
                run::prefill(&mut model, &info, &limits, opts, &load, warm_tpt_ms, say)?
            }
        };
        root.insert(w.name().into(), v);
    }
    Ok(Value::Object(root))
}

/// GB/s of O_DIRECT reads of one expert's size at K in flight on the expert file of the model
/// in `dir` (reading `total_bytes`), and whether O_DIRECT was accepted (buffered reads
/// otherwise): the disk limit the benchmarks put beside expert streaming, for other backends.
pub fn expert_disk_bandwidth(dir: &Path, model: &Model, total_bytes: usize) -> Result<(f64, bool)> {
    Ok(io::disk_probe(&model_info(dir, model)?, total_bytes))
}

/// Every dense matrix one decoded token multiplies: each layer's mixer, router, shared expert
/// (or dense MLP), and the head (not the embedding, of which a token reads one row).
pub(crate) fn dense_linears(model: &Model) -> Vec<&Linear> {
    let mut v = vec![&model.lm_head];
    for l in &model.layers {
        match &l.mixer {
            Mixer::Attention(a) => v.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]),
            Mixer::DeltaNet(g) => {
                let p = &g.proj;
                v.extend([&p.qkv, &p.z, &p.b, &p.a, &g.out_proj]);
            }
        }
        match &l.ffn {
            Ffn::Moe(m) => {
                v.push(&m.router);
                if let Some(s) = &m.shared {
                    v.extend([&s.gate, &s.up, &s.down]);
                }
                v.extend(m.shared_gate.as_ref());
            }
            Ffn::Dense(d) => v.extend([&d.gate, &d.up, &d.down]),
        }
    }
    v
}

/// Bytes of dense weights one decoded token reads: every matrix of `dense_linears` and the
/// GatedDeltaNet convolutions. The embedding contributes one row, ignored.
pub fn dense_bytes_per_token(model: &Model) -> usize {
    let conv: usize = model
        .layers
        .iter()
        .map(|l| match &l.mixer {
            Mixer::DeltaNet(g) => g.conv_w.len() * 4,
            Mixer::Attention(_) => 0,
        })
        .sum();
    conv + dense_linears(model)
        .iter()
        .map(|l| l.nbytes())
        .sum::<usize>()
}

/// Multiply-adds of one prompt token's weight products, split by the arithmetic they run in:
/// (int8, f32). int8: 2- and 4-bit affine matrices when activations are int8 (`act_int8`),
/// `k` routed experts of `expert_bits` included; f32: the rest. Attention's scores and the
/// recurrent state's updates are left out (small next to the weights at prompt lengths of a
/// few thousand), and so is the head, which a prompt runs once per step, not per token.
pub(crate) fn madds_per_token(
    model: &Model,
    k: usize,
    expert_bits: u32,
    act_int8: bool,
) -> (f64, f64) {
    let int8 = |bits: u32| act_int8 && matches!(bits, 2 | 4);
    let (mut i8m, mut f32m) = (0f64, 0f64);
    for l in dense_linears(model).into_iter().skip(1) {
        let m = (l.rows() * l.cols()) as f64;
        match l {
            Linear::Affine { bits, .. } if int8(*bits) => i8m += m,
            _ => f32m += m,
        }
    }
    let c = &model.cfg;
    let moe_layers = (0..c.num_layers).filter(|&l| c.is_moe_layer(l)).count();
    let routed = (moe_layers * k * 3 * c.moe_intermediate_size * c.hidden_size) as f64;
    if int8(expert_bits) {
        i8m += routed;
    } else {
        f32m += routed;
    }
    (i8m, f32m)
}

/// Dense bytes held resident: those read per token plus the embedding table.
pub fn dense_bytes_total(model: &Model) -> usize {
    let tied = model.cfg.tie_word_embeddings;
    dense_bytes_per_token(model) + if tied { 0 } else { model.embed.nbytes() }
}

/// Per-token bytes of the MoE blocks alone: routers, shared experts and K routed experts.
pub(crate) fn moe_bytes_per_token(model: &Model, k: usize, expert_bytes: usize) -> usize {
    model
        .layers
        .iter()
        .map(|l| match &l.ffn {
            Ffn::Moe(m) => {
                m.router.nbytes()
                    + m.shared
                        .as_ref()
                        .map_or(0, |s| s.gate.nbytes() + s.up.nbytes() + s.down.nbytes())
                    + m.shared_gate.as_ref().map_or(0, Linear::nbytes)
                    + k * expert_bytes
            }
            Ffn::Dense(_) => 0,
        })
        .sum()
}

fn model_info(dir: &Path, model: &Model) -> Result<ModelInfo> {
    let k = model.top_k;
    let first_moe = (0..model.cfg.num_layers).find(|&l| model.cfg.is_moe_layer(l));
    let (bits, expert_bytes) = match first_moe {
        Some(l) => {
            let e = model.experts.fetch(l, &[0])?;
            let bits = match e.first().map(|w| &w.gate) {
                Some(Linear::Affine { bits, .. }) => *bits,
                _ => 16,
            };
            (bits, e.first().map_or(0, |w| w.nbytes()))
        }
        None => (16, 0),
    };
    let read_bytes = packed::align_up(expert_bytes.max(1) as u64, packed::EXPERT_ALIGN) as usize;
    if packed::is_packed_dir(dir) {
        let man = packed::Manifest::read(dir)?;
        let files: Vec<PathBuf> = man
            .experts
            .layers
            .iter()
            .map(|l| dir.join(&l.file))
            .collect();
        let probe_file = files.first().cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: packed model without expert files",
                dir.display()
            ))
        })?;
        let mut warm_files = files.clone();
        warm_files.push(dir.join(packed::DENSE_FILE));
        Ok(ModelInfo {
            packed: true,
            probe_file,
            expert_files: files,
            warm_files,
            bits,
            k,
            expert_bytes,
            read_bytes,
        })
    } else {
        let mut best: Option<(u64, PathBuf)> = None;
        let mut warm_files = Vec::new();
        for e in std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                warm_files.push(p.clone());
                if best.as_ref().is_none_or(|b| len > b.0) {
                    best = Some((len, p));
                }
            }
        }
        let probe_file = best.map(|b| b.1).ok_or_else(|| {
            Error::Invalid(format!("{}: no safetensors file to probe", dir.display()))
        })?;
        Ok(ModelInfo {
            packed: false,
            probe_file,
            expert_files: Vec::new(),
            warm_files,
            bits,
            k,
            expert_bytes,
            read_bytes,
        })
    }
}

/// Resident set size of this process now, bytes (0 where the OS does not say).
pub fn rss_bytes() -> u64 {
    crate::os::rss_bytes().unwrap_or(0)
}

/// Memory available to this process, bytes (0 where unknown; see [`crate::os::mem_available`]).
pub fn mem_available() -> u64 {
    crate::os::mem_available().unwrap_or(0)
}

/// Reads `files` once, sequentially, so their pages are in the page cache. Returns false (and
/// reads nothing) when they would not fit in 80% of the available memory.
pub(crate) fn warm_page_cache(files: &[PathBuf]) -> Result<bool> {
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    if total as f64 > 0.8 * mem_available() as f64 {
        return Ok(false);
    }
    let mut buf = vec![0u8; 8 << 20];
    for f in files {
        let mut h = File::open(f).map_err(|e| Error::io(f, e))?;
        loop {
            let n = h.read(&mut buf).map_err(|e| Error::io(f, e))?;
            if n == 0 {
                break;
            }
        }
    }
    Ok(true)
}
