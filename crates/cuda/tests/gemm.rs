//! The tensor-core prompt GEMM (`qgemm`, src/gemm.rs) against its plain twin, the `mm` kernel
//! (the float path it replaces for T > 1), and the f32 reference `matmul_ref`: random affine
//! matrices of every code width (2/4/8), group (32/64/128) and scale dtype (bf16/f16/f32),
//! ragged row counts (tiles of 128 rows) and ragged token counts 1, 7, 64, 300 (tiles of 64);
//! several products in one launch with their own rows and tokens; and the routed experts'
//! form (x gathered by row ids while staged, a device table of products, the per-token
//! combine). Bound: NMSE < 1e-10 against the reference (x keeps about 22 bits, codes are
//! exact, sums are f32: measured values are printed), where the harness allows 1e-4.
//! Without a GPU the test prints "skipped: no CUDA device (CI has no GPU)" and passes.
use flashmoe_core::backend::conformance::{random_linear, Fmt};
use flashmoe_core::kernels::matmul_ref;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;
use flashmoe_cuda::device::{DBuf, Device};
use flashmoe_cuda::gemm::{self, GemmProb};
use flashmoe_cuda::ops::{self, DMat};
use rand::{rngs::StdRng, Rng, SeedableRng};

const BOUND: f64 = 1e-10;

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output {g}");
        num += ((*g - *w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    num / den.max(1e-30)
}

fn device() -> Option<Device> {
    if !flashmoe_cuda::device_available() {
        flashmoe_testdata::say_skipped("no CUDA device (CI has no GPU)");
        return None;
    }
    let dev = Device::new(0).expect("a CUDA device is present but could not be opened");
    if dev.arch.0 < 8 {
        flashmoe_testdata::say_skipped("the tensor-core GEMM needs sm_80 or later");
        return None;
    }
    Some(dev)
}

fn read(dev: &Device, b: &DBuf, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    dev.read_f32(b.ptr(), &mut v).expect("read back");
    v
}

fn lg(w: &Linear) -> u32 {
    match w {
        Linear::Affine { group, .. } => group.trailing_zeros(),
        _ => unreachable!("affine matrices only"),
    }
}

fn prob(m: &DMat, y: &DBuf, ntok: usize, x0: usize) -> GemmProb {
    GemmProb {
        w: m.m.w,
        s: m.m.s,
        b: m.m.b,
        y: y.ptr(),
        rows: m.m.rows as i32,
        ldy: m.m.rows as i32,
        ntok: ntok as i32,
        x0: x0 as i32,
    }
}

/// `ws` (one format and width) over the same t rows of x in one launch, each against the
/// reference and the `mm` twin; returns the worst NMSE against the reference.
fn products(dev: &Device, ws: &[Linear], t: usize, rng: &mut StdRng, what: &str) -> f64 {
    let cols = ws[0].cols();
    let x: Vec<f32> = (0..t * cols).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    let xb = dev.upload_f32(&x).expect("upload x");
    let ms: Vec<DMat> = ws
        .iter()
        .map(|w| ops::upload_rows(dev, &[(w, 0, w.rows())]).expect("upload"))
        .collect();
    let ys: Vec<DBuf> = ws
        .iter()
        .map(|w| dev.alloc(t * w.rows() * 4).expect("alloc"))
        .collect();
    for m in &ms {
        assert!(gemm::fits(dev, &m.m), "{what}: the GEMM should take it");
    }
    let xq = dev
        .alloc(gemm::staged_len(t, cols, lg(&ws[0])) * 4)
        .expect("alloc");
    gemm::stage_x(dev, &ms[0].m, xb.ptr(), cols, 0, t, xq.ptr()).expect("stage x");
    let probs: Vec<GemmProb> = ms.iter().zip(&ys).map(|(m, y)| prob(m, y, t, 0)).collect();
    gemm::products(dev, &ms[0].m, &probs, xq.ptr(), t).expect("gemm");
    let mut worst = 0f64;
    for ((w, m), y) in ws.iter().zip(&ms).zip(&ys) {
        let rows = w.rows();
        let got = read(dev, y, t * rows);
        let mut want = vec![0f32; t * rows];
        matmul_ref(&w.view(), &x, t, &mut want);
        let twin = dev.alloc(t * rows * 4).expect("alloc");
        let p = [(m.m.w, m.m.s, m.m.b, xb.ptr(), twin.ptr())];
        ops::matvec_batch(dev, &dev.compute, &m.m, &p, t, cols, rows).expect("mm twin");
        let twin = read(dev, &twin, t * rows);
        let (e, et) = (nmse(&got, &want), nmse(&twin, &want));
        eprintln!(
            "{what} {rows}x{cols} t={t}: gemm nmse {e:.2e}, mm twin {et:.2e}, gemm vs twin {:.2e}",
            nmse(&got, &twin)
        );
        assert!(
            e < BOUND,
            "{what} {rows}x{cols} t={t}: gemm nmse {e:.3e} (twin {et:.3e})"
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn gemm_matches_mm_twin_cuda() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(0x9e3d);
    let mut worst = 0f64;
    let mut case = 0;
    for bits in [2, 4, 8] {
        for group in [32, 64, 128] {
            for sdt in [DType::BF16, DType::F16, DType::F32] {
                let rows = [130, 1, 257][case % 3];
                let cols = [512, 256, 384][case % 3];
                case += 1;
                let w = random_linear(&mut rng, rows, cols, Fmt::Affine(bits, group, sdt));
                for t in [1, 7, 64, 300] {
                    let what = format!("{bits}-bit g{group} {sdt:?}");
                    worst = worst.max(products(&dev, std::slice::from_ref(&w), t, &mut rng, &what));
                }
            }
        }
    }
    // Several products of one launch, their own row counts (q|k|v-like), and a model-sized one.
    let f = Fmt::Affine(4, 64, DType::BF16);
    let ws: Vec<Linear> = [300, 64, 200]
        .iter()
        .map(|&r| random_linear(&mut rng, r, 1024, f))
        .collect();
    worst = worst.max(products(&dev, &ws, 70, &mut rng, "batched 4-bit g64"));
    let w = random_linear(&mut rng, 1030, 4096, f);
    worst = worst.max(products(&dev, &[w], 300, &mut rng, "4-bit g64 bf16"));
    eprintln!("worst gemm nmse {worst:.2e} (bound {BOUND:e})");
}

/// The routed experts' form: rows gathered while x is staged, products read from a device
/// table (each expert its own tokens and first staged row), and the per-token combine adding
/// each token's weighted rows in order (missing ones marked -1).
#[test]
fn gemm_expert_table_and_combine_cuda() {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(0x7ab1e);
    let (h, rows, t, k) = (256, 192, 40, 2);
    let f = Fmt::Affine(4, 32, DType::F16);
    let ws: Vec<Linear> = (0..3)
        .map(|_| random_linear(&mut rng, rows, h, f))
        .collect();
    let ms: Vec<DMat> = ws
        .iter()
        .map(|w| ops::upload_rows(&dev, &[(w, 0, rows)]).expect("upload"))
        .collect();
    let x: Vec<f32> = (0..t * h).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    // Expert e takes tokens with (token + e) % 3 != 0 (ragged counts); per token its rows in
    // expert order.
    let mut src: Vec<usize> = Vec::new();
    let mut per: Vec<(usize, usize)> = Vec::new(); // (first row, count) per expert
    let mut back: Vec<Vec<(i32, f32)>> = vec![Vec::new(); t];
    for e in 0..3 {
        let x0 = src.len();
        for tok in (0..t).filter(|tok| (tok + e) % 3 != 0) {
            back[tok].push((src.len() as i32, rng.gen_range(0.1f32..1.0)));
            src.push(tok);
        }
        per.push((x0, src.len() - x0));
    }
    let total = src.len();
    let xb = dev.upload_f32(&x).expect("upload");
    let idx: Vec<i32> = src.iter().map(|&s| s as i32).collect();
    let ib = dev.upload(bytemuck::cast_slice(&idx)).expect("upload");
    let xq = dev.alloc(gemm::staged_len(total, h, 5) * 4).expect("alloc");
    gemm::stage_x(&dev, &ms[0].m, xb.ptr(), h, ib.ptr(), total, xq.ptr()).expect("stage");
    let y = dev.alloc(total * rows * 4).expect("alloc");
    let tbl: Vec<GemmProb> = ms
        .iter()
        .zip(&per)
        .map(|(m, &(x0, n))| GemmProb {
            y: y.ptr() + (x0 * rows * 4) as u64,
            ..prob(m, &y, n, x0)
        })
        .collect();
    let tb = dev.upload(table_bytes(&tbl).as_slice()).expect("upload");
    let most = per.iter().map(|p| p.1).max().unwrap_or(0);
    gemm::products_table(&dev, &ms[0].m, tb.ptr(), 3, rows, most, xq.ptr(), total)
        .expect("table gemm");
    let yh = read(&dev, &y, total * rows);
    let mut want = vec![0f32; total * rows];
    for (w, &(x0, n)) in ws.iter().zip(&per) {
        let xg: Vec<f32> = src[x0..x0 + n]
            .iter()
            .flat_map(|&tok| x[tok * h..(tok + 1) * h].to_vec())
            .collect();
        matmul_ref(&w.view(), &xg, n, &mut want[x0 * rows..(x0 + n) * rows]);
    }
    let e = nmse(&yh, &want);
    eprintln!("expert table: nmse {e:.2e}");
    assert!(e < BOUND, "expert table: nmse {e:.3e}");
    // The combine over those rows (width `rows` here), one slot more than any token uses.
    let out0: Vec<f32> = (0..t * rows).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let ob = dev.upload_f32(&out0).expect("upload");
    let (mut ci, mut cw) = (Vec::new(), Vec::new());
    for b in &back {
        for j in 0..k + 1 {
            ci.push(b.get(j).map_or(-1, |r| r.0));
            cw.push(b.get(j).map_or(0.0, |r| r.1));
        }
    }
    let cib = dev.upload(bytemuck::cast_slice(&ci)).expect("upload");
    let cwb = dev.upload_f32(&cw).expect("upload");
    gemm::rows_combine(
        &dev,
        ob.ptr(),
        y.ptr(),
        cib.ptr(),
        cwb.ptr(),
        k + 1,
        t,
        rows,
    )
    .expect("combine");
    let got = read(&dev, &ob, t * rows);
    let mut want = out0;
    for (tok, b) in back.iter().enumerate() {
        for &(r, w) in b {
            for i in 0..rows {
                want[tok * rows + i] += w * yh[r as usize * rows + i];
            }
        }
    }
    let e = nmse(&got, &want);
    eprintln!("rows combine: nmse {e:.2e}");
    assert!(e < 1e-12, "rows combine: nmse {e:.3e}");
}

/// A product table as the kernel reads it.
fn table_bytes(ps: &[GemmProb]) -> Vec<u8> {
    let w: Vec<u32> = ps.iter().flat_map(|p| p.words()).collect();
    bytemuck::cast_slice(&w).to_vec()
}
