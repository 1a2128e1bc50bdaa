//! ExpertSource: the one place where expert weights on disk become canonical expert matrices.
//! The model asks for (layer, expert ids) and gets gate/up/down matrices; how they are found
//! (slices of an mmap'd checkpoint, parallel pread from a packed model, a cache) is hidden here.
//! Every source counts what it read so that `--timing` and `bench` can report bytes and hits.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::store::TensorStore;
use crate::weights::{load_matrix, Linear};

/// One expert's SwiGLU weights: gate, up [I, H]; down [H, I].
#[derive(Clone)]
pub struct ExpertWeights {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl ExpertWeights {
    pub fn nbytes(&self) -> usize {
        self.gate.nbytes() + self.up.nbytes() + self.down.nbytes()
    }
}

/// Counters every source keeps (monotonic; readers take differences).
#[derive(Default, Debug)]
pub struct ExpertCounters {
    pub fetched: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Bytes served without touching the disk (page cache as measured, or a RAM/VRAM cache).
    pub bytes_cached: AtomicU64,
    pub read_ns: AtomicU64,
    /// Experts served as views of the file's mapping (resident pages, no read or copy).
    pub mapped: AtomicU64,
}

#[derive(Clone, Copy, Default, Debug)]
pub struct ExpertStatsSnapshot {
    pub fetched: u64,
    pub bytes_read: u64,
    pub bytes_cached: u64,
    pub read_ns: u64,
    pub mapped: u64,
}

impl ExpertCounters {
    pub fn snapshot(&self) -> ExpertStatsSnapshot {
        ExpertStatsSnapshot {
            fetched: self.fetched.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_cached: self.bytes_cached.load(Ordering::Relaxed),
            read_ns: self.read_ns.load(Ordering::Relaxed),
            mapped: self.mapped.load(Ordering::Relaxed),
        }
    }
}

impl ExpertStatsSnapshot {
    pub fn since(&self, earlier: &ExpertStatsSnapshot) -> ExpertStatsSnapshot {
        ExpertStatsSnapshot {
            fetched: self.fetched - earlier.fetched,
            bytes_read: self.bytes_read - earlier.bytes_read,
            bytes_cached: self.bytes_cached - earlier.bytes_cached,
            read_ns: self.read_ns - earlier.read_ns,
            mapped: self.mapped - earlier.mapped,
        }
    }
}

pub trait ExpertSource: Send + Sync {
    /// Starts reading these experts of `layer` without waiting (the model computes the shared
    /// expert meanwhile). A source that reads synchronously may ignore it.
    fn prefetch(&self, _layer: usize, _experts: &[usize]) {}
    /// The experts' weights, in the order asked; blocks until their bytes are available.
    fn fetch(&self, layer: usize, experts: &[usize]) -> Result<Vec<ExpertWeights>>;
    fn counters(&self) -> &ExpertCounters;
    /// Bytes of one expert as stored (for bounds and reports).
    fn expert_bytes(&self) -> usize;
    fn describe(&self) -> String;
    /// (hits, misses) of a RAM expert cache in front of the reads (`crate::cache`), if any.
    fn cache_hits(&self) -> Option<(u64, u64)> {
        None
    }
}

/// How one layer's experts sit in a checkpoint.
enum LayerExperts {
    /// gate [E*I, H], up [E*I, H], down [E*H, I] (MLX switch_mlp, HF fused split by rows).
    Stacked {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// HF fused `gate_up_proj` [E, 2I, H]: expert e's gate rows then up rows.
    FusedGateUp { gate_up: Linear, down: Linear },
    /// HF per-expert tensors.
    PerExpert(Vec<ExpertWeights>),
    /// Dense-MLP layer: no experts.
    None,
}

/// Experts read straight from the mmap'd checkpoint (the page cache does the caching).
pub struct StoreExperts {
    layers: Vec<LayerExperts>,
    inter: usize,
    hidden: usize,
    counters: ExpertCounters,
    expert_bytes: usize,
}

impl StoreExperts {
    pub fn new(store: &TensorStore, cfg: &ModelConfig) -> Result<Self> {
        let (e, i, h) = (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let mut expert_bytes = 0;
        for l in 0..cfg.num_layers {
            if !cfg.is_moe_layer(l) {
                layers.push(LayerExperts::None);
                continue;
            }
            let p = format!("layers.{l}.mlp");
            let le = if store.has(&format!("{p}.switch_mlp.gate_proj.weight")) {
                LayerExperts::Stacked {
                    gate: load_matrix(
                        store,
                        &format!("{p}.switch_mlp.gate_proj.weight"),
                        &[e],
                        i,
                        h,
                    )?,
                    up: load_matrix(store, &format!("{p}.switch_mlp.up_proj.weight"), &[e], i, h)?,
                    down: load_matrix(
                        store,
                        &format!("{p}.switch_mlp.down_proj.weight"),
                        &[e],
                        h,
                        i,
                    )?,
                }
            } else if store.has(&format!("{p}.experts.gate_up_proj")) {
                LayerExperts::FusedGateUp {
                    gate_up: load_matrix(
                        store,
                        &format!("{p}.experts.gate_up_proj"),
                        &[e],
                        2 * i,
                        h,
                    )?,
                    down: load_matrix(store, &format!("{p}.experts.down_proj"), &[e], h, i)?,
                }
            } else {
                let mut v = Vec::with_capacity(e);
                for x in 0..e {
                    let q = format!("{p}.experts.{x}");
                    v.push(ExpertWeights {
                        gate: load_matrix(store, &format!("{q}.gate_proj.weight"), &[], i, h)?,
                        up: load_matrix(store, &format!("{q}.up_proj.weight"), &[], i, h)?,
                        down: load_matrix(store, &format!("{q}.down_proj.weight"), &[], h, i)?,
                    });
                }
                LayerExperts::PerExpert(v)
            };
            let s = StoreExperts::one(&le, 0, i, h);
            expert_bytes = s.nbytes();
            layers.push(le);
        }
        Ok(StoreExperts {
            layers,
            inter: i,
            hidden: h,
            counters: ExpertCounters::default(),
            expert_bytes,
        })
    }

    fn one(le: &LayerExperts, x: usize, i: usize, h: usize) -> ExpertWeights {
        match le {
            LayerExperts::Stacked { gate, up, down } => ExpertWeights {
                gate: gate.slice_rows(x * i, i),
                up: up.slice_rows(x * i, i),
                down: down.slice_rows(x * h, h),
            },
            LayerExperts::FusedGateUp { gate_up, down } => ExpertWeights {
                gate: gate_up.slice_rows(x * 2 * i, i),
                up: gate_up.slice_rows(x * 2 * i + i, i),
                down: down.slice_rows(x * h, h),
            },
            LayerExperts::PerExpert(v) => v[x].clone(),
            LayerExperts::None => unreachable!("experts requested from a dense-MLP layer"),
        }
    }
}

impl ExpertSource for StoreExperts {
    fn fetch(&self, layer: usize, experts: &[usize]) -> Result<Vec<ExpertWeights>> {
        let out: Vec<ExpertWeights> = experts
            .iter()
            .map(|&x| StoreExperts::one(&self.layers[layer], x, self.inter, self.hidden))
            .collect();
        let bytes: usize = out.iter().map(|e| e.nbytes()).sum();
        self.counters
            .fetched
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(out)
    }
    fn counters(&self) -> &ExpertCounters {
        &self.counters
    }
    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }
    fn describe(&self) -> String {
        "checkpoint (mmap; no separate reads, so no read time or page-cache figures)".into()
    }
}
