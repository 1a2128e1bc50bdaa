//! `flashmoe trace simulate FILE --cache-gb G[,G2...] [--tiers vram=G,pinned=G,page=G]`:
//! replays the trace's expert accesses (each record's distinct experts, ascending: the order
//! the engine fetches them) against every policy of `flashmoe_core::cache` (the same code the
//! engine's `--cache-policy` runs) and Belady's optimum, and turns hits into bytes and time
//! per token. `--cache-gb`: one cache per size in front of the disk. `--tiers`: a hierarchy,
//! each tier seeing the misses of the one before it (as the CUDA VRAM tier's misses go to the
//! pinned tier), the last tier's misses read from the disk.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::cache::{belady_hits, warmup_accesses, CachePolicy, DEFAULT_WARMUP_TOKENS};
use serde_json::{json, Value};

use super::tokens::{accesses, token_count};
use super::{r4, FileArg};
use crate::cmd::out::outln;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub file: FileArg,
    /// Cache sizes to simulate, in GB, comma-separated (one cache in front of the disk each)
    #[arg(long, value_name = "G[,G2...]", value_delimiter = ',')]
    pub cache_gb: Vec<f64>,
    /// A hierarchy of tiers in order, e.g. vram=8,pinned=32,page=64 (GB each)
    #[arg(long, value_name = "NAME=G,...")]
    pub tiers: Option<String>,
    /// Bytes of one expert (default: as recorded in the trace), to ask about another
    /// quantisation of the same model
    #[arg(long, value_name = "B")]
    pub expert_bytes: Option<u64>,
    /// Bandwidths in GB/s of what a hit in each tier and a miss cost, e.g.
    /// ram=20,pinned=25,page=10,disk=3 (vram hits cost nothing: the bytes are in place)
    #[arg(long, value_name = "NAME=GBPS,...")]
    pub bw: Option<String>,
    /// Take the memory (ram, page) and disk bandwidths from a `flashmoe bench --json` report
    #[arg(long, value_name = "FILE")]
    pub bench: Option<PathBuf>,
    /// Decode tokens the `static` policy counts before pinning
    #[arg(long, default_value_t = DEFAULT_WARMUP_TOKENS)]
    pub warmup_tokens: usize,
}

/// `a=1,b=2.5` into (name, value) pairs, in order.
fn pairs(s: &str, what: &str) -> Result<Vec<(String, f64)>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("{what}: `{p}` is not NAME=NUMBER"))?;
            let x: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                .with_context(|| format!("{what}: `{v}` is not a non-negative number"))?;
            Ok((k.trim().to_string(), x))
        })
        .collect()
}

/// The first number under `key` anywhere in a JSON report.
fn find(v: &Value, key: &str) -> Option<f64> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_f64)
            .or_else(|| m.values().find_map(|x| find(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}

/// Hits of one policy at `cap` experts on `seq` (in order), and the misses it passes on.
fn replay(p: CachePolicy, cap: usize, seq: &[u64], moe: &[usize], warm: usize) -> (u64, Vec<u64>) {
    let mut pol = p.build(cap, moe, warm);
    let mut ev = Vec::new();
    let mut hits = 0;
    let mut misses = Vec::new();
    for &k in seq {
        ev.clear();
        if pol.access(k, &mut ev) {
            hits += 1;
        } else {
            misses.push(k);
        }
    }
    (hits, misses)
}

pub fn run(a: Args) -> Result<()> {
    if a.cache_gb.is_empty() && a.tiers.is_none() {
        bail!("give --cache-gb G[,G2...] and/or --tiers vram=G,pinned=G,page=G");
    }
    if let Some(g) = a.cache_gb.iter().find(|g| !g.is_finite() || **g < 0.0) {
        bail!("--cache-gb: `{g}` is not a size in GB");
    }
    let t = super::read(&a.file.file)?;
    let h = &t.header;
    let eb = a.expert_bytes.unwrap_or(h.expert_bytes);
    if eb == 0 {
        bail!("the trace records no expert size; give --expert-bytes B");
    }
    let seq = accesses(&t);
    let tokens = token_count(&t).max(1);
    let moe: Vec<usize> = h.moe_layers.iter().map(|&l| l as usize).collect();
    let warm = warmup_accesses(a.warmup_tokens, h.k as usize, moe.len());
    let mut bw: BTreeMap<String, f64> = BTreeMap::new();
    if let Some(p) = &a.bench {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a bench --json report", p.display()))?;
        if let Some(m) = find(&v, "mem_read_bw_gbs") {
            bw.insert("ram".into(), m);
            bw.insert("page".into(), m);
        }
        if let Some(d) = find(&v, "disk_read_bw_gbs") {
            bw.insert("disk".into(), d);
        }
    }
    if let Some(s) = &a.bw {
        bw.extend(pairs(s, "--bw")?);
    }
    bw.entry("vram".into()).or_insert(f64::INFINITY);
    let cap_of = |g: f64| ((g * 1e9) as usize) / eb as usize;
    // Time of one token from the bytes each tier served and the bytes read from the disk.
    let time_ms = |served: &[(String, f64)], disk: f64| -> Option<f64> {
        let mut ms = 0.0;
        for (tier, b) in served
            .iter()
            .map(|(n, b)| (n.as_str(), *b))
            .chain([("disk", disk)])
        {
            let g = bw.get(tier)?;
            if b > 0.0 {
                ms += b / g / 1e6;
            }
        }
        Some(ms)
    };
    let per_tok = |hits: u64| hits as f64 * eb as f64 / tokens as f64;
    let mut sizes = Vec::new();
    let mut policies: Vec<(&str, Option<CachePolicy>)> = CachePolicy::ALL
        .iter()
        .map(|p| (p.name(), Some(*p)))
        .collect();
    policies.push(("belady", None));
    for &g in &a.cache_gb {
        let cap = cap_of(g);
        let rows: Vec<Value> = policies
            .iter()
            .map(|&(name, p)| {
                let hits = match p {
                    Some(p) => replay(p, cap, &seq, &moe, warm).0,
                    None => belady_hits(&seq, cap),
                };
                let miss = seq.len() as u64 - hits;
                let served = [("ram".to_string(), per_tok(hits))];
                json!({
                    "policy": name, "hits": hits, "misses": miss,
                    "hit_rate": r4(hits as f64 / seq.len().max(1) as f64),
                    "cached_bytes_per_token": r4(per_tok(hits)),
                    "disk_bytes_per_token": r4(per_tok(miss)),
                    "ms_per_token": time_ms(&served, per_tok(miss)).map(r4),
                })
            })
            .collect();
        sizes.push(json!({"cache_gb": g, "capacity_experts": cap, "policies": rows}));
    }
    let mut tiers_out = Value::Null;
    if let Some(s) = &a.tiers {
        let tiers = pairs(s, "--tiers")?;
        let rows: Vec<Value> = policies
            .iter()
            .map(|&(name, p)| {
                let mut stream = seq.clone();
                let mut per = Vec::new();
                let mut served = Vec::new();
                let total: usize = tiers.iter().map(|t| cap_of(t.1)).sum();
                for (i, (tier, g)) in tiers.iter().enumerate() {
                    let cap = cap_of(*g);
                    let (hits, rest) = match p {
                        Some(p) => replay(p, cap, &stream, &moe, warm),
                        // The bound: every tier's capacity as one optimal cache, its hits
                        // put in the first tier (the misses' order is not needed after).
                        None if i == 0 => {
                            let h = belady_hits(&stream, total);
                            (h, vec![0; stream.len() - h as usize])
                        }
                        None => (0, std::mem::take(&mut stream)),
                    };
                    per.push(
                        json!({"tier": tier, "gb": g, "capacity_experts": cap, "hits": hits,
                        "hit_rate": r4(hits as f64 / seq.len().max(1) as f64)}),
                    );
                    served.push((tier.clone(), per_tok(hits)));
                    stream = rest;
                }
                let disk = per_tok(stream.len() as u64);
                json!({"policy": name, "tiers": per, "disk_misses": stream.len(),
                    "disk_bytes_per_token": r4(disk),
                    "ms_per_token": time_ms(&served, disk).map(r4)})
            })
            .collect();
        tiers_out = json!({"tiers": tiers.iter().map(|t| json!({"name": t.0, "gb": t.1})).collect::<Vec<_>>(), "policies": rows});
    }
    let missing: Vec<&str> = ["ram", "disk"]
        .into_iter()
        .filter(|k| !bw.contains_key(*k))
        .collect();
    let report = json!({
        "file": a.file.file.display().to_string(),
        "model": h.model_id, "tokens": tokens, "accesses": seq.len(), "expert_bytes": eb,
        "static_warmup_tokens": a.warmup_tokens,
        "bandwidths_gbs": bw.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "sizes": sizes, "hierarchy": tiers_out,
    });
    if a.file.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    outln!(
        "{}: {} tokens, {} expert accesses, {} bytes per expert",
        a.file.file.display(),
        tokens,
        seq.len(),
        eb
    )?;
    if !missing.is_empty() {
        outln!(
            "(time per token needs bandwidths for: {}; give --bw or --bench)",
            missing.join(", ")
        )?;
    }
    for s in report["sizes"].as_array().into_iter().flatten() {
        outln!(
            "cache {} GB ({} experts):",
            s["cache_gb"],
            s["capacity_experts"]
        )?;
        outln!("  policy      hit rate  disk MB/token  ms/token")?;
        for r in s["policies"].as_array().into_iter().flatten() {
            outln!(
                "  {:<10}  {:>8.4}  {:>13.3}  {:>8}",
                r["policy"].as_str().unwrap_or(""),
                r["hit_rate"].as_f64().unwrap_or(0.0),
                r["disk_bytes_per_token"].as_f64().unwrap_or(0.0) / 1e6,
                r["ms_per_token"]
            )?;
        }
    }
    if let Some(rows) = report["hierarchy"]["policies"].as_array() {
        outln!("hierarchy {}:", a.tiers.as_deref().unwrap_or(""))?;
        for r in rows {
            let tiers: Vec<String> = r["tiers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    format!(
                        "{} {:.4}",
                        t["tier"].as_str().unwrap_or(""),
                        t["hit_rate"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect();
            outln!(
                "  {:<10}  {}  disk MB/token {:.3}  ms/token {}",
                r["policy"].as_str().unwrap_or(""),
                tiers.join("  "),
                r["disk_bytes_per_token"].as_f64().unwrap_or(0.0) / 1e6,
                r["ms_per_token"]
            )?;
        }
    }
    Ok(())
}
