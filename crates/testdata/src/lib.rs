//! Where tests find the shared reference data (`../shared` beside the checkout, or
//! `FLASHMOE_SHARED`), with one rule for every crate: missing data is a failure under CI and a
//! printed skip elsewhere, never a silent pass.
use std::path::{Path, PathBuf};

pub mod golden;

/// The shared reference directory for a crate of this workspace (`manifest_dir` is its
/// `CARGO_MANIFEST_DIR`): `$FLASHMOE_SHARED`, else `<manifest_dir>/../../../shared`.
///
/// Returns `None` after printing why when it is absent; panics instead when `CI` is set.
pub fn shared_dir(manifest_dir: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("FLASHMOE_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(manifest_dir).join("../../../shared"),
    };
    if dir.join("golden").is_dir() && dir.join("tokenizer").is_dir() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but the shared reference data is missing at {} (set FLASHMOE_SHARED)",
            dir.display()
        );
    }
    say_skipped(&format!(
        "shared reference data not found at {} (set FLASHMOE_SHARED)",
        dir.display()
    ));
    None
}

/// Prints `skipped: WHY` to the process's stderr itself, not through `eprintln!`, which the
/// test harness captures and discards for passing tests: a skip must show in the CI log.
/// The test harness names each test's thread after the test.
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let t = std::thread::current();
    let name = t.name().unwrap_or("?");
    let _ = writeln!(std::io::stderr().lock(), "{name}: skipped: {why}");
}

/// float32 / int64 tensors of a golden safetensors file, as f32 / i64 vectors with shapes.
pub struct Golden {
    pub f32s: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub i64s: std::collections::HashMap<String, Vec<i64>>,
    pub meta: serde_json::Value,
}

impl Golden {
    /// Reads `golden.safetensors` and `golden.json` of a fixture directory.
    pub fn load(dir: &std::path::Path) -> Golden {
        let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parse");
        let mut f32s = std::collections::HashMap::new();
        let mut i64s = std::collections::HashMap::new();
        for (name, t) in st.tensors() {
            let d = t.data();
            match t.dtype() {
                safetensors::Dtype::F32 => {
                    let v = d
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    f32s.insert(name, (t.shape().to_vec(), v));
                }
                safetensors::Dtype::I64 => {
                    let v = d
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    i64s.insert(name, v);
                }
                _ => {}
            }
        }
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
        )
        .expect("golden.json parse");
        Golden { f32s, i64s, meta }
    }
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.i64s[key].iter().map(|&x| x as u32).collect()
    }
    pub fn prompt_len(&self, section: &str) -> usize {
        self.meta[section]["prompt_len"]
            .as_u64()
            .expect("prompt_len") as usize
    }
}

/// Largest absolute difference of two equally long slices; NaN where any difference is NaN
/// (`f32::max` would drop it, and a bound `err < tol` would pass on NaN outputs).
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

#[cfg(test)]
mod tests {
    /// A NaN anywhere makes the difference NaN, so that `max_abs(..) < tol` fails.
    #[test]
    fn max_abs_keeps_nan() {
        assert!(super::max_abs(&[1.0, f32::NAN, 2.0], &[1.0, 0.0, 0.0]).is_nan());
        assert!(super::max_abs(&[f32::NAN, 0.0], &[0.0, 0.0]).is_nan());
        assert_eq!(super::max_abs(&[1.0, -2.0], &[0.5, 0.0]), 2.0);
    }
}
