//! Kernel probe for tuning: GB/s of `matvec_act` per format and shape, median and best of many
//! passes over distinct matrices, beside the memory read bandwidth of the same run.
//!   cargo run --release -p flashmoe-core --example matvec_probe -- [MB] [PASSES] SPEC...
//! SPEC: `q4i:1024x4096` (q4 | q2 | q8 exact, q4i | q2i int8 activations); group 64, bf16
//! scales. `q4:1024x4096@10`: `matmul` with 10 inputs instead (prefill's few-token experts;
//! `q4i:...@64`: the int8 product);
//! the figure is then also GMAC/s). Threads: RAYON_NUM_THREADS. NOPROBE=1 skips most of the memory probe (for
//! callgrind: instructions per call = difference of two pass counts, e.g. `1 1` and `1 21`).
use flashmoe_core::kernels::{matmul, matvec_act, ActQuant, AffineView, Scales, WeightView};
use half::bf16;
use std::time::Instant;

fn rnd(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Seconds of CPU time this process has used (all threads): on a machine shared with other
/// work, a time slice lost to another process is not counted against the kernel.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec that clock_gettime fills in.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mb: usize = args[0].parse().unwrap();
    let passes: usize = args[1].parse().unwrap();
    let threads = rayon::current_num_threads();
    // CPUTIME=1: time passes by the CPU time they used (then GB/s and GMAC/s are per CPU
    // second: with SPLIT=2, per core).
    let cpu = std::env::var("CPUTIME").is_ok();
    let now = || if cpu { cpu_seconds() } else { 0.0 };
    // SPLIT=n: n plain threads, each running its share of the matrices (RAYON_NUM_THREADS=1
    // makes each product serial), as decode runs one expert per thread.
    let split: usize = std::env::var("SPLIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mem = flashmoe_core::probe::memory_read_bandwidth(
        if std::env::var("NOPROBE").is_ok() {
            1 << 16
        } else {
            256 << 20
        },
        threads,
    );
    println!("threads {threads} mem {mem:.2} GB/s");
    for spec in &args[2..] {
        let (f, shape) = spec.split_once(':').unwrap();
        let (shape, n) = shape.split_once('@').unwrap_or((shape, "1"));
        let n: usize = n.parse().unwrap();
        let (r, c) = shape.split_once('x').unwrap();
        let (rows, cols): (usize, usize) = (r.parse().unwrap(), c.parse().unwrap());
        let (bits, aq) = match f {
            "q4" => (4, ActQuant::Exact),
            "q2" => (2, ActQuant::Exact),
            "q8" => (8, ActQuant::Exact),
            "q4i" => (4, ActQuant::Int8),
            "q2i" => (2, ActQuant::Int8),
            _ => panic!("format {f}"),
        };
        let group = 64;
        let mut s = 0x9e3779b97f4a7c15u64;
        let nw = rows * cols * bits / 32;
        let ng = rows * cols / group;
        let one = nw * 4 + ng * 4;
        let copies = ((mb << 20) / one).clamp(1, 4096);
        let mats: Vec<(Vec<u32>, Vec<bf16>, Vec<bf16>)> = (0..copies)
            .map(|_| {
                (
                    (0..nw).map(|_| rnd(&mut s) as u32).collect(),
                    (0..ng)
                        .map(|_| bf16::from_f32(0.001 + (rnd(&mut s) % 1000) as f32 * 1e-5))
                        .collect(),
                    (0..ng)
                        .map(|_| bf16::from_f32(-((rnd(&mut s) % 1000) as f32) * 5e-5))
                        .collect(),
                )
            })
            .collect();
        let x: Vec<f32> = (0..cols * n)
            .map(|_| (rnd(&mut s) % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let mut y = vec![0f32; rows * n];
        let mut t = Vec::new();
        // `matmul` reads the process-wide switch (q4i@N: the int8 product of `int8mm`).
        flashmoe_core::kernels::set_act_quant(aq);
        for _ in 0..passes {
            let (t0, c0) = (Instant::now(), now());
            let run = |mats: &[(Vec<u32>, Vec<bf16>, Vec<bf16>)], y: &mut [f32]| {
                for (w, sc, bi) in mats {
                    let v = WeightView::Affine(AffineView {
                        bits: bits as u32,
                        group,
                        rows,
                        cols,
                        w,
                        scales: Scales::Bf16(sc),
                        biases: Scales::Bf16(bi),
                    });
                    if n == 1 {
                        matvec_act(aq, &v, &x, y);
                    } else {
                        matmul(&v, &x, n, y);
                    }
                }
            };
            if split > 1 {
                let per = mats.len().div_ceil(split);
                std::thread::scope(|s| {
                    for part in mats.chunks(per) {
                        let run = &run;
                        s.spawn(move || run(part, &mut vec![0f32; rows * n]));
                    }
                });
            } else {
                run(&mats, &mut y);
            }
            std::hint::black_box(&y);
            t.push(if cpu {
                now() - c0
            } else {
                t0.elapsed().as_secs_f64()
            });
        }
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let bytes = (one * copies) as f64;
        let med = bytes / t[t.len() / 2] / 1e9;
        let best = bytes / t[0] / 1e9;
        let macs = (rows * cols * n * copies) as f64;
        let (gmac, gmac_best) = (macs / t[t.len() / 2] / 1e9, macs / t[0] / 1e9);
        println!(
            "{spec:18} copies {copies:4} med {med:6.2} GB/s ({:.3})  best {best:6.2} ({:.3})  us/call {:.1}  GMAC/s {gmac:.2} best {gmac_best:.2}",
            med / mem,
            best / mem,
            t[t.len() / 2] / copies as f64 * 1e6
        );
    }
}
