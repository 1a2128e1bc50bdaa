//! I/O benchmark: expert reads through the model's ExpertSource at K in flight (cached: page
//! cache warm; direct: O_DIRECT), each beside plain positional reads of the same size and
//! parallelism on the same layer file (`probe::disk_read_bandwidth`), measured in this run.
use std::time::Instant;

use rand::seq::index::sample;
use rand::SeedableRng;
use serde_json::Value;

use crate::error::Result;
use crate::loader::IoMode;
use crate::model::Model;
use crate::probe::disk_read_bandwidth;

use super::{warm_page_cache, BenchOptions, Limits, ModelInfo, Section};

/// O_DIRECT GB/s of expert-sized reads at K in flight on the probe file; buffered reads when
/// the filesystem refuses O_DIRECT (the bool says which).
pub(crate) fn disk_probe(info: &ModelInfo, total: usize) -> (f64, bool) {
    let k = info.k.max(1);
    match disk_read_bandwidth(&info.probe_file, info.read_bytes, k, true, total) {
        Ok(g) => (g, true),
        Err(_) => (
            disk_read_bandwidth(&info.probe_file, info.read_bytes, k, false, total)
                .unwrap_or(f64::NAN),
            false,
        ),
    }
}

/// GB/s of `rounds` fetches of K distinct random experts of the first MoE layer, each round's
/// reads queued at once (prefetch) and then awaited (fetch), as the model does.
pub(crate) fn expert_read_gbs(model: &Model, k: usize, total: usize, seed: u64) -> Result<f64> {
    let Some(layer) = (0..model.cfg.num_layers).find(|&l| model.cfg.is_moe_layer(l)) else {
        return Ok(f64::NAN);
    };
    let src = model.experts.as_ref();
    let e = model.cfg.num_experts;
    let k = k.min(e).max(1);
    let rounds = (total / (k * src.expert_bytes().max(1))).max(2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..rounds {
        let ids: Vec<usize> = sample(&mut rng, e, k).into_vec();
        src.prefetch(layer, &ids);
        let ws = src.fetch(layer, &ids)?;
        bytes += ws.iter().map(|w| w.nbytes()).sum::<usize>();
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
}

pub(crate) fn bench(
    model: &Model,
    info: &ModelInfo,
    limits: &Limits,
    opts: &BenchOptions,
    load: &dyn Fn(IoMode) -> Result<Model>,
    say: &dyn Fn(&str),
) -> Result<Value> {
    let mut s = Section::default();
    let k = info.k.max(1);
    s.val("k_in_flight", k);
    s.val("read_bytes", info.read_bytes);
    s.val("file", info.probe_file.display().to_string());
    if !info.packed {
        s.val(
            "note",
            "not a packed model: experts are mmap'd slices of the checkpoint, no reads to measure; \
             only the probes ran",
        );
        s.num("direct_probe_bw_gbs", limits.disk_gbs);
        return Ok(s.into_value());
    }
    let total = opts.io_mb << 20;
    if opts.cold {
        say("io: direct expert reads");
        let cold = load(IoMode::Direct);
        match cold {
            Ok(cold) => {
                let g = expert_read_gbs(&cold, k, total, 1)?;
                s.fig("direct_expert_read_bw", "gbs", g, limits.disk_gbs);
                s.val("direct_limit_is_o_direct", limits.disk_direct);
            }
            Err(e) => s.val("direct_note", format!("--io direct unavailable: {e}")),
        }
    }
    say("io: warming the page cache with the expert files");
    let warm = warm_page_cache(&info.expert_files)?;
    s.val("page_cache_warm", warm);
    let probe =
        disk_read_bandwidth(&info.probe_file, info.read_bytes, k, false, total).unwrap_or(f64::NAN);
    say("io: cached expert reads");
    let before = model.experts.counters().snapshot();
    let g = expert_read_gbs(model, k, total, 2)?;
    let d = model.experts.counters().snapshot().since(&before);
    s.fig("cached_expert_read_bw", "gbs", g, probe);
    if d.mapped > 0 {
        let f = d.mapped as f64 / d.fetched.max(1) as f64;
        s.num("cached_served_from_mapping_fraction", f);
        s.val(
            "cached_note",
            "experts whose pages are resident are served as views of the file's mapping, not \
             read: the GB/s is the rate the source hands them out (no copy), which can exceed \
             the buffered-read limit and memory bandwidth",
        );
    }
    s.num("mem_read_bw_gbs", limits.mem_gbs);
    Ok(s.into_value())
}
