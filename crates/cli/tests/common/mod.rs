//! Helpers for CLI tests: the binary, the shared reference dir, temp dirs.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary on the exact activation path (`FLASHMOE_EXACT=1`, `--exact`): the golden
/// comparisons hold logits to 1e-3 of transformers, which the default int8 activations do not
/// (`default_activations_are_int8` checks that default).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flashmoe"));
    c.env("FLASHMOE_EXACT", "1");
    c
}

/// The binary with its default settings (int8 activations), whatever the environment says.
pub fn bin_defaults() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flashmoe"));
    c.env_remove("FLASHMOE_EXACT");
    c
}

/// The shared reference directory (see `flashmoe_testdata::shared_dir`).
pub fn shared_dir() -> Option<PathBuf> {
    flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh, empty directory under the target dir (removed at the start of the next run).
pub fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn flashmoe");
    assert!(
        out.status.success(),
        "flashmoe failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn flashmoe");
    assert!(!out.status.success(), "expected failure, got success");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "must not panic: {err}");
    err
}

pub fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::write(path, content).expect("write test file");
}

/// The float32 `logits` tensor of a safetensors file written by `flashmoe logits`.
pub fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("read logits file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse logits file");
    let t = st.tensor("logits").expect("tensor `logits`");
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}
