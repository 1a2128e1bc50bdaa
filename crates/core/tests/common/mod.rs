//! Test helpers shared by integration tests: locating ../shared and reading golden files.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

/// The shared reference directory (see `flashmoe_testdata::shared_dir`).
pub fn shared_dir() -> Option<PathBuf> {
    flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))
}

/// float32 / int64 tensors of a golden safetensors file, as f32 / i64 vectors with shapes.
pub struct Golden {
    pub f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub i64s: HashMap<String, Vec<i64>>,
    pub meta: serde_json::Value,
}

impl Golden {
    pub fn load(dir: &std::path::Path) -> Golden {
        let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parse");
        let mut f32s = HashMap::new();
        let mut i64s = HashMap::new();
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

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub mod mlx_convert;

/// Logits for every position: `prefill` tokens as one prompt, then one token at a time
/// through the cached state.
pub fn logits(model: &flashmoe_core::model::Model, ids: &[u32], prefill: usize) -> Vec<f32> {
    use flashmoe_core::model::{ForwardStats, Logits, State};
    let mut st = State::new(&model.cfg);
    let mut stats = ForwardStats::default();
    let mut out = model
        .forward(&ids[..prefill], &mut st, Logits::All, &mut stats, None)
        .expect("prefill");
    for &id in &ids[prefill..] {
        out.extend(
            model
                .forward(&[id], &mut st, Logits::Last, &mut stats, None)
                .expect("decode"),
        );
    }
    out
}
