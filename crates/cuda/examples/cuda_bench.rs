//! `cargo run --release -p flashmoe-cuda --example cuda_bench -- [MODEL_DIR] [--layers N]
//! [--k K] [--tokens T] [--prefill-tokens N] [--no-kernels] [--vram-only] [--ptx-only]
//! [--core-path]`: prints bench_cuda's JSON (every figure of `Model<Cuda>`, core's forward pass
//! on the CUDA backend); with `--core-path` also `core_path`: decode, prefill and traces of
//! `Model<Cuda>` on the dense synthetic model and on MODEL_DIR under the keys of the former
//! A/B against the deleted tuned loop. With `--ptx-only`, compiles the kernels for sm_90
//! through NVRTC and exits (no GPU needed).
use flashmoe_core::loader::{open_model, LoadOptions};
use std::sync::Arc;

use flashmoe_cuda::bench::core_path;
use flashmoe_cuda::{bench_cuda, BenchOptions, Device};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--ptx-only") {
        match Device::ptx_for((9, 0)) {
            Ok(p) => println!("PTX ok: {} bytes", p.len()),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }
    // The epilogue A/B switch, an explicit option of the thread that runs the tokens.
    if std::env::var("FLASHMOE_CUDA_EPILOGUES").is_ok_and(|v| v == "0") {
        flashmoe_cuda::ops::set_epilogues(false);
    }
    let mut opts = BenchOptions::default();
    let mut dir = None;
    let mut core = false;
    let mut i = 0;
    while i < args.len() {
        let v = |i: usize| {
            args.get(i + 1)
                .and_then(|s| s.parse::<usize>().ok())
                .expect("a number")
        };
        match args[i].as_str() {
            "--layers" => {
                opts.synth_layers = v(i);
                i += 1;
            }
            "--k" => {
                opts.synth_k = v(i);
                i += 1;
            }
            "--tokens" => {
                opts.tokens = v(i);
                i += 1;
            }
            "--prefill-tokens" => {
                opts.prefill_tokens = v(i);
                i += 1;
            }
            "--no-kernels" => opts.kernels = false,
            "--core-path" => core = true,
            "--vram-only" => {
                opts.host_modes = false;
                opts.model_decode = false;
            }
            d => dir = Some(d.to_string()),
        }
        i += 1;
    }
    let dir = dir.expect("usage: cuda_bench MODEL_DIR [--layers N] [--k K] [--tokens T]");
    let model = match open_model(std::path::Path::new(&dir), &LoadOptions::default()) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            eprintln!("loading {dir}: {e}");
            std::process::exit(1);
        }
    };
    let mut v = match bench_cuda(model.clone(), &opts) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    if core {
        v["core_path"] = core_path(model, &opts);
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
}
