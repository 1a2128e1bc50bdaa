//! With a one-thread rayon pool (`--threads 1`) the CPU backend runs a layer's routed experts
//! on the calling thread: handing them to the pool's only thread cost two wake-ups per layer
//! and ran nothing in parallel. The results are the same as in a pool of two threads.
//! (Its own test binary: the global pool is built once per process.)
use std::sync::Mutex;

use flashmoe_core::backend::conformance::MemExperts;
use flashmoe_core::backend::{Backend, Cpu, ExpertCall, Routes};
use flashmoe_core::buf::Buf;
use flashmoe_core::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;
use flashmoe_core::Result;

/// Records, per fetch, whether it ran on a rayon worker thread.
struct Recording {
    inner: MemExperts,
    on_worker: Mutex<Vec<bool>>,
}

impl ExpertSource for Recording {
    fn fetch(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertWeights>> {
        let mut seen = self.on_worker.lock().unwrap_or_else(|e| e.into_inner());
        seen.push(rayon::current_thread_index().is_some());
        self.inner.fetch(layer, ids)
    }
    fn counters(&self) -> &ExpertCounters {
        self.inner.counters()
    }
    fn expert_bytes(&self) -> usize {
        self.inner.expert_bytes()
    }
    fn describe(&self) -> String {
        "recording".into()
    }
}

fn dense(rows: usize, cols: usize, seed: u32) -> Linear {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5
        })
        .collect();
    Linear::Dense {
        dtype: DType::F32,
        rows,
        cols,
        data: Buf::from_vec(&v),
    }
}

#[test]
fn one_thread_pool_runs_experts_on_the_calling_thread() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("the first global pool of this process");
    // 3 x 128 x 1024 f32 = 1.5 MB an expert: above the size the backend runs in parallel.
    let (h, i) = (1024, 128);
    let experts = (0..4)
        .map(|e| ExpertWeights {
            gate: dense(i, h, 3 * e),
            up: dense(i, h, 3 * e + 1),
            down: dense(h, i, 3 * e + 2),
        })
        .collect();
    let src = Recording {
        inner: MemExperts {
            experts,
            counters: ExpertCounters::default(),
        },
        on_worker: Mutex::new(Vec::new()),
    };
    assert!(src.expert_bytes() >= 1 << 20);
    let x: Vec<f32> = (0..h).map(|j| (j as f32 * 0.37).sin()).collect();
    let routes = Routes {
        k: 3,
        ids: vec![2, 0, 3],
        weights: vec![0.5, 0.3, 0.2],
    };
    let run = || {
        let call = ExpertCall {
            source: &src,
            layer: 0,
            parallel: true,
        };
        let mut out = vec![0f32; h];
        Cpu.moe_experts(call, &x, &routes, None, &mut out)
            .expect("moe_experts");
        out
    };
    let one = run();
    let seen = src.on_worker.lock().unwrap().clone();
    assert_eq!(seen, vec![false; 3], "expert fetches ran on a rayon worker");
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool of two")
        .install(run);
    assert_eq!(one, two, "one thread and two give different results");
    assert!(one.iter().any(|v| *v != 0.0));
}
