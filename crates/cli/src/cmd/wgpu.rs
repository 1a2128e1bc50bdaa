//! The wgpu side of `--backend`: the factory of sequences on a wgpu adapter, the adapter
//! listing of `flashmoe devices`, and `auto`'s test for a hardware GPU. Without the `wgpu`
//! feature the same functions say it is not built in.
use anyhow::Result;

use flashmoe_core::session::BackendFactory;

/// `flashmoe devices`' lines, one per adapter; `None` when wgpu is not built in.
#[cfg(feature = "wgpu")]
pub fn adapter_lines() -> Option<Vec<String>> {
    Some(
        flashmoe_wgpu::adapters()
            .iter()
            .map(|a| {
                format!(
                    "{}: {} ({}, {}, {}){}",
                    a.index,
                    a.name,
                    a.backend,
                    a.device_type,
                    a.driver,
                    if a.software {
                        " software: never chosen by --backend auto"
                    } else {
                        ""
                    }
                )
            })
            .collect(),
    )
}

/// The name of the adapter `auto` would run on: `index`'s, or the first hardware GPU's; a
/// software adapter (lavapipe) is never chosen.
#[cfg(feature = "wgpu")]
pub fn hardware_adapter(index: Option<usize>) -> Option<String> {
    if !gpu_device_nodes() {
        return None;
    }
    let all = flashmoe_wgpu::adapters();
    let a = match index {
        Some(i) => all.into_iter().nth(i)?,
        None => all.into_iter().find(|a| !a.software)?,
    };
    (!a.software).then_some(a.name)
}

/// Whether this machine can have a hardware GPU adapter at all. On Linux a GPU driver exposes
/// a render node (`/dev/dri/renderD*`) or NVIDIA's `/dev/nvidia*`; without one, `auto` skips
/// creating a Vulkan instance: it costs ~0.1 s and, where only Mesa's software driver is
/// installed and `XDG_RUNTIME_DIR` is unset, its window-system probe prints "error:" lines
/// a CPU run should not show.
#[cfg(all(feature = "wgpu", target_os = "linux"))]
fn gpu_device_nodes() -> bool {
    let render = std::fs::read_dir("/dev/dri").is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    });
    render || std::path::Path::new("/dev/nvidia0").exists()
}

#[cfg(all(feature = "wgpu", not(target_os = "linux")))]
fn gpu_device_nodes() -> bool {
    true
}

/// The fast products' configuration named by `FLASHMOE_WGPU_FAST` (`Fast::spec`, e.g.
/// `r2_lg32_wg256_sg_d2_lean`), for A/B runs of the product kernels; unset or empty: the
/// adapter's default.
#[cfg(feature = "wgpu")]
fn fast_option() -> Result<Option<flashmoe_wgpu::Fast>> {
    let v = std::env::var("FLASHMOE_WGPU_FAST").unwrap_or_default();
    if v.is_empty() {
        return Ok(None);
    }
    match flashmoe_wgpu::Fast::from_spec(&v) {
        Some(f) => Ok(Some(f)),
        None => anyhow::bail!(
            "FLASHMOE_WGPU_FAST={v}: not a fast-product configuration (such as \
             r2_lg32_wg256_sg, or r2_lg32_wg256_sg_d2 for the decode form)"
        ),
    }
}

/// Every kernel's pipeline without naga's forced loop bounding (`Wgpu::set_lean_kernels`),
/// the default; `FLASHMOE_WGPU_LEAN=0` forces the bounding back on, for A/B runs.
#[cfg(feature = "wgpu")]
fn lean_option() -> bool {
    std::env::var("FLASHMOE_WGPU_LEAN").map_or(true, |v| v != "0")
}

/// Device memory for routed-expert slots when `--vram-cache-gb` is not given (wgpu cannot
/// ask how much is free).
#[cfg(feature = "wgpu")]
const DEFAULT_SLOT_BYTES: usize = 4 << 30;

/// Sequences on a wgpu adapter: the first call uploads the model's dense weights (once per
/// process; later sequences share them) and keeps routed experts in device slots
/// (`vram_cache_bytes`, else [`DEFAULT_SLOT_BYTES`]; LRU). `allow_software`: `--backend wgpu`
/// was named.
#[cfg(feature = "wgpu")]
pub fn factory(
    adapter: Option<usize>,
    allow_software: bool,
    vram_cache_bytes: Option<usize>,
) -> Result<BackendFactory> {
    use std::sync::{Arc, Mutex};

    use flashmoe_core::model::Model;
    use flashmoe_core::model_seq::ModelSeq;
    use flashmoe_core::session::SeqBackend;
    use flashmoe_wgpu::{Options, Wgpu};

    let opts = Options {
        adapter,
        allow_software,
        row_per_thread: None,
        fast: fast_option()?,
    };
    // The CPU model the upload came from, and the upload.
    type Uploaded = (Arc<Model>, Arc<Model<Wgpu>>);
    let uploaded: Arc<Mutex<Option<Uploaded>>> = Arc::default();
    Ok(BackendFactory::new("wgpu", move |model| {
        let mut slot = uploaded
            .lock()
            .map_err(|_| flashmoe_core::error::Error::Invalid("wgpu model lock poisoned".into()))?;
        let m = match &*slot {
            Some((src, m)) if Arc::ptr_eq(src, &model) => m.clone(),
            _ => {
                let be = Wgpu::new(opts)?;
                be.set_lean_kernels(lean_option())?;
                eprintln!("wgpu: {} ({})", be.adapter().name, be.adapter().backend);
                let m = flashmoe_core::model::upload_to(&model, be)?;
                flashmoe_wgpu::with_residency(&m, vram_cache_bytes.unwrap_or(DEFAULT_SLOT_BYTES))?;
                let m = Arc::new(m);
                *slot = Some((model.clone(), m.clone()));
                m
            }
        };
        Ok(Box::new(ModelSeq::new(m)) as Box<dyn SeqBackend>)
    }))
}

/// `bench --backend wgpu`'s section: the adapter's copy and upload bandwidths, the 4-bit
/// product at dense shapes beside them, and decode on the device.
#[cfg(feature = "wgpu")]
pub fn bench(
    model: &std::sync::Arc<flashmoe_core::model::Model>,
    tokens: usize,
) -> Result<serde_json::Value> {
    let be = flashmoe_wgpu::Wgpu::new(flashmoe_wgpu::Options {
        adapter: None,
        allow_software: true,
        row_per_thread: None,
        fast: fast_option()?,
    })?;
    be.set_lean_kernels(lean_option())?;
    let opts = flashmoe_wgpu::BenchOptions {
        tokens: tokens.max(1),
        ..Default::default()
    };
    let v = flashmoe_wgpu::bench(be, model, &opts)?;
    // One resident decode token's commands timed on the device, as a table on stderr (the
    // report on stdout stays one JSON document with --json).
    eprintln!("wgpu: one resident decode token on the device:");
    for line in flashmoe_wgpu::trace_table(&v["decode_resident"]["kernel_trace"]) {
        eprintln!("  {line}");
    }
    Ok(v)
}

#[cfg(not(feature = "wgpu"))]
pub fn bench(
    _model: &std::sync::Arc<flashmoe_core::model::Model>,
    _tokens: usize,
) -> Result<serde_json::Value> {
    factory(None, true, None).map(|_| serde_json::Value::Null)
}

#[cfg(not(feature = "wgpu"))]
pub fn adapter_lines() -> Option<Vec<String>> {
    None
}

#[cfg(not(feature = "wgpu"))]
pub fn hardware_adapter(_index: Option<usize>) -> Option<String> {
    None
}

#[cfg(not(feature = "wgpu"))]
pub fn factory(
    _adapter: Option<usize>,
    _allow_software: bool,
    _vram_cache_bytes: Option<usize>,
) -> Result<BackendFactory> {
    anyhow::bail!(
        "--backend wgpu: this flashmoe was built without wgpu support; rebuild with \
         `cargo build --release -p flashmoe --features wgpu`"
    )
}
