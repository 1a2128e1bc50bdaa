//! One test body per operation, run on every device (as candle's `test_device!`): the CPU
//! kernels and the CUDA kernels, each against the plain reference twins of flashmoe_core
//! (NMSE bound), the token's epilogues on `Model<Cuda>`, and the engine's session on CUDA.
//! Without a GPU the CUDA cases print "skipped: no CUDA device (CI has no GPU)" and pass.
use std::path::PathBuf;

use flashmoe_core::buf::Buf;
use flashmoe_core::kernels;
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::model::Logits;
use flashmoe_core::session::SeqBackend;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;
use flashmoe_cuda::device::Device;
use flashmoe_cuda::{ops, CudaOptions};
use flashmoe_testdata::{max_abs, Golden};
use half::{bf16, f16};

/// The operations under test, as each device computes them.
trait TestDev {
    fn name(&self) -> &'static str;
    /// y [n, rows] = W x for x [n, cols].
    fn matmul(&self, w: &Linear, x: &[f32], n: usize) -> Vec<f32>;
    fn rmsnorm(&self, x: &[f32], w: &[f32], rows: usize, eps: f32) -> Vec<f32>;
    fn swiglu(&self, g: &[f32], u: &[f32]) -> Vec<f32>;
    /// Index of the largest value (first on ties; NaN never wins).
    fn argmax(&self, x: &[f32]) -> usize;
    /// (ids, weights) of the renormalised top-k of softmax(logits).
    fn topk(&self, logits: &[f32], k: usize) -> (Vec<usize>, Vec<f32>);
    /// Kernel variants of one product to run in turn (CUDA: dp4a and exact float decode).
    fn variants(&self) -> Vec<&'static str> {
        vec!["default"]
    }
    fn set_variant(&self, _v: &str) {}
}

struct Cpu;
impl TestDev for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn matmul(&self, w: &Linear, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * w.rows()];
        kernels::matmul(&w.view(), x, n, &mut y);
        y
    }
    fn rmsnorm(&self, x: &[f32], w: &[f32], _rows: usize, eps: f32) -> Vec<f32> {
        let mut o = vec![0f32; x.len()];
        for (xr, or) in x.chunks(w.len()).zip(o.chunks_mut(w.len())) {
            kernels::rmsnorm(xr, w, eps, false, or);
        }
        o
    }
    fn swiglu(&self, g: &[f32], u: &[f32]) -> Vec<f32> {
        let mut o = vec![0f32; g.len()];
        kernels::swiglu(g, u, &mut o);
        o
    }
    fn argmax(&self, x: &[f32]) -> usize {
        // First index of the largest value; NaN never wins.
        let mut b = 0;
        for (i, v) in x.iter().enumerate() {
            if *v > x[b] || x[b].is_nan() && !v.is_nan() {
                b = i;
            }
        }
        b
    }
    fn topk(&self, logits: &[f32], k: usize) -> (Vec<usize>, Vec<f32>) {
        let mut p = logits.to_vec();
        kernels::softmax_inplace(&mut p);
        let sel = kernels::top_k(&p, k);
        let s: f32 = sel.iter().map(|x| x.1).sum();
        (
            sel.iter().map(|x| x.0).collect(),
            sel.iter().map(|x| x.1 / s).collect(),
        )
    }
}

struct Cuda(Device);
impl Cuda {
    fn read(&self, p: u64, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n];
        self.0.read_f32(p, &mut v).expect("read");
        v
    }
}
impl TestDev for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn variants(&self) -> Vec<&'static str> {
        vec!["auto", "prep", "float", "float1", "float2", "float4", "mma"]
    }
    fn set_variant(&self, v: &str) {
        ops::set_affine_path(match v {
            "float" | "float1" | "float2" | "float4" => ops::AffinePath::Float,
            "mma" => ops::AffinePath::Mma,
            "prep" => ops::AffinePath::Prepared,
            _ => ops::AffinePath::Auto,
        });
        // The float decode kernel's rows per warp (1, 2, 4; 0 = by shape).
        ops::set_rows_per_warp(match v {
            "float1" => 1,
            "float2" => 2,
            "float4" => 4,
            _ => 0,
        });
    }
    fn matmul(&self, w: &Linear, x: &[f32], n: usize) -> Vec<f32> {
        let d = &self.0;
        let m = ops::upload_rows(d, &[(w, 0, w.rows())]).expect("upload");
        let xd = d.upload_f32(x).unwrap();
        let yd = d.alloc(n * w.rows() * 4).unwrap();
        // Poison the output so an unwritten element shows.
        d.write(yd.ptr(), &vec![0xffu8; n * w.rows() * 4]).unwrap();
        let p = [(m.m.w, m.m.s, m.m.b, xd.ptr(), yd.ptr())];
        ops::matvec_batch(d, &d.compute, &m.m, &p, n, w.cols(), w.rows()).expect("matvec");
        self.read(yd.ptr(), n * w.rows())
    }
    fn rmsnorm(&self, x: &[f32], w: &[f32], rows: usize, eps: f32) -> Vec<f32> {
        let d = &self.0;
        let n = w.len();
        let (xd, wd, od) = (
            d.upload_f32(x).unwrap(),
            d.upload_f32(w).unwrap(),
            d.alloc(x.len() * 4).unwrap(),
        );
        ops::rmsnorm_rows(d, xd.ptr(), n, wd.ptr(), od.ptr(), n, n, rows, eps, None).unwrap();
        self.read(od.ptr(), x.len())
    }
    fn swiglu(&self, g: &[f32], u: &[f32]) -> Vec<f32> {
        let d = &self.0;
        let mut gu = g.to_vec();
        gu.extend_from_slice(u);
        let gd = d.upload_f32(&gu).unwrap();
        let hd = d.alloc(g.len() * 4).unwrap();
        ops::swiglu(d, gd.ptr(), hd.ptr(), g.len(), 1, None).unwrap();
        self.read(hd.ptr(), g.len())
    }
    fn argmax(&self, x: &[f32]) -> usize {
        let d = &self.0;
        let xd = d.upload_f32(x).unwrap();
        let key = d.alloc(8).unwrap();
        ops::argmax(d, xd.ptr(), x.len(), key.ptr()).unwrap();
        let k = self.read(key.ptr(), 2);
        let key = (k[1].to_bits() as u64) << 32 | k[0].to_bits() as u64;
        ops::argmax_index(key) as usize
    }
    fn topk(&self, logits: &[f32], k: usize) -> (Vec<usize>, Vec<f32>) {
        let d = &self.0;
        let ld = d.upload_f32(logits).unwrap();
        let ids = d.alloc(k * 4).unwrap();
        let wts = d.alloc(k * 4).unwrap();
        ops::router_topk(d, ld.ptr(), logits.len(), k, true, ids.ptr(), wts.ptr()).unwrap();
        let idf = self.read(ids.ptr(), k);
        let ids: Vec<usize> = idf.iter().map(|f| f.to_bits() as usize).collect();
        (ids, self.read(wts.ptr(), k))
    }
}

fn cuda() -> Option<Cuda> {
    if !flashmoe_cuda::device_available() {
        flashmoe_testdata::say_skipped("no CUDA device (CI has no GPU)");
        return None;
    }
    Some(Cuda(
        Device::new(0).expect("a CUDA device is present but could not be opened"),
    ))
}

macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&Cpu);
        }
        #[test]
        fn $cuda() {
            if let Some(d) = cuda() {
                $body(&d);
            }
        }
    };
}

struct Rng(u64);
impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    fn f(&mut self) -> f32 {
        (self.u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut num = 0f64;
    let mut den = 0f64;
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite output {g}");
        num += ((*g - *w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    num / den.max(1e-30)
}

fn affine(rng: &mut Rng, bits: u32, group: usize, rows: usize, cols: usize, sdt: DType) -> Linear {
    let w: Vec<u32> = (0..rows * cols * bits as usize / 32)
        .map(|_| rng.u32())
        .collect();
    let ng = rows * cols / group;
    // Scales of both signs (MLX writes negative ones, arch-spec §11.3).
    let s: Vec<f32> = (0..ng).map(|_| rng.f() * 0.05).collect();
    let b: Vec<f32> = (0..ng).map(|_| rng.f() * 0.1).collect();
    let (scales, biases) = match sdt {
        DType::BF16 => (
            Buf::from_vec(&s.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>()),
            Buf::from_vec(&b.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>()),
        ),
        DType::F16 => (
            Buf::from_vec(&s.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>()),
            Buf::from_vec(&b.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>()),
        ),
        _ => (Buf::from_vec(&s), Buf::from_vec(&b)),
    };
    Linear::Affine {
        bits,
        group,
        rows,
        cols,
        w: Buf::from_vec(&w),
        scales,
        biases,
        sdtype: sdt,
    }
}

fn dense(rng: &mut Rng, dt: DType, rows: usize, cols: usize) -> Linear {
    let v = rng.vec(rows * cols);
    let data = match dt {
        DType::BF16 => Buf::from_vec(&v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>()),
        DType::F16 => Buf::from_vec(&v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>()),
        _ => Buf::from_vec(&v),
    };
    Linear::Dense {
        dtype: dt,
        rows,
        cols,
        data,
    }
}

/// NMSE bound of a product: f32 arithmetic on exact weights lands near 1e-14; the CUDA dp4a
/// decode kernel quantises x to two int8 levels (about 16 bits), near 1e-10.
fn bound(w: &Linear) -> f64 {
    match w {
        Linear::Affine { .. } => 1e-8,
        Linear::Dense { .. } => 1e-10,
    }
}

fn check_product(dev: &dyn TestDev, w: &Linear, n: usize, rng: &mut Rng, what: &str) {
    let x: Vec<f32> = rng.vec(n * w.cols()).iter().map(|v| v * 4.0).collect();
    let mut want = vec![0f32; n * w.rows()];
    kernels::matmul_ref(&w.view(), &x, n, &mut want);
    for v in dev.variants() {
        dev.set_variant(v);
        let got = dev.matmul(w, &x, n);
        let e = nmse(&got, &want);
        eprintln!("{} ({v}): {what} n={n}: nmse {e:.2e}", dev.name());
        assert!(
            e < bound(w),
            "{} ({v}): {what} n={n}: nmse {e:.3e}",
            dev.name()
        );
    }
    dev.set_variant("default");
}

fn matvec_body(dev: &dyn TestDev) {
    let mut rng = Rng(0x1234_5678_9abc);
    for (bits, group, rows, cols) in [
        (4, 64, 300, 512),
        (4, 32, 33, 4096),
        (2, 64, 40, 256),
        (2, 32, 17, 96),
        (8, 64, 70, 320),
        (8, 128, 9, 1024),
        // Tall enough for several row groups per block of the prepared-x kernel.
        (4, 64, 4500, 256),
    ] {
        for sdt in [DType::BF16, DType::F16, DType::F32] {
            let w = affine(&mut rng, bits, group, rows, cols, sdt);
            check_product(
                dev,
                &w,
                1,
                &mut rng,
                &format!("{bits}-bit g{group} {sdt:?} {rows}x{cols}"),
            );
        }
    }
    for dt in [DType::BF16, DType::F16, DType::F32] {
        for (rows, cols) in [(129, 256), (20, 100)] {
            let w = dense(&mut rng, dt, rows, cols);
            check_product(dev, &w, 1, &mut rng, &format!("dense {dt:?} {rows}x{cols}"));
        }
    }
}
test_device!(matvec_body, matvec_cpu, matvec_cuda);

/// x prepared by its producer (rmsnorm, add_rmsnorm, SwiGLU) for the `mp` matvec gives the same
/// bits as `quant_x3` preparing it before the matvec: same output, same products, for 2-, 4- and
/// 8-bit codes, one x shared by problems (qb = 0) and one per problem.
#[test]
fn prepared_by_producer_cuda() {
    let Some(c) = cuda() else { return };
    let d = &c.0;
    ops::set_affine_path(ops::AffinePath::Prepared);
    let mut rng = Rng(0x5eed_0001);
    for (bits, group, rows, cols) in [(4, 64, 70, 4096), (2, 64, 40, 1024), (8, 64, 33, 512)] {
        let w = affine(&mut rng, bits, group, rows, cols, DType::BF16);
        let proj = ops::Proj::new(d, &[(&w, 0, rows)]).unwrap();
        assert_eq!(
            proj.prepared_bits(),
            Some(bits),
            "{bits}-bit takes the mp kernel"
        );
        let x = rng.vec(cols);
        let nw: Vec<f32> = rng.vec(cols).iter().map(|v| 1.0 + v * 0.5).collect();
        let (xd, wd, od, yd) = (
            d.upload_f32(&x).unwrap(),
            d.upload_f32(&nw).unwrap(),
            d.alloc(cols * 4).unwrap(),
            d.alloc(rows * 4).unwrap(),
        );
        let pre = Some(ops::Prepared {
            at: d.qx_slot(0),
            bits,
            qb: 0,
        });
        let what = format!("{bits}-bit {rows}x{cols}");
        // rmsnorm_rows -> matvec.
        let norm = |pre| {
            let (x, w, o) = (xd.ptr(), wd.ptr(), od.ptr());
            ops::rmsnorm_rows(d, x, cols, w, o, cols, cols, 1, 1e-6, pre).unwrap()
        };
        norm(None);
        proj.run(d, od.ptr(), yd.ptr()).unwrap();
        let (n0, y0) = (c.read(od.ptr(), cols), c.read(yd.ptr(), rows));
        norm(pre);
        proj.run_prepared(d, od.ptr(), yd.ptr(), pre).unwrap();
        assert_eq!(n0, c.read(od.ptr(), cols), "rmsnorm output, {what}");
        assert_eq!(
            y0,
            c.read(yd.ptr(), rows),
            "rmsnorm-prepared product, {what}"
        );
        // add_rmsnorm -> matvec, prepared in two slots (the second for another width), with
        // the residual updated in the kernel; then deferred (several blocks, x left alone).
        let dd = d.upload_f32(&rng.vec(cols)).unwrap();
        // Each call on a fresh copy of x (the residual it may update).
        let add_norm = |pre: [Option<ops::Prepared>; 2], res| {
            let x2 = d.upload_f32(&x).unwrap();
            let (dp, w, o) = (dd.ptr(), wd.ptr(), od.ptr());
            ops::add_rmsnorm(d, x2.ptr(), dp, w, o, cols, 1e-6, pre, res).unwrap();
            x2
        };
        let u = ops::Residual::Update;
        let x2 = add_norm([None, None], u);
        proj.run(d, od.ptr(), yd.ptr()).unwrap();
        let (n0, y0, sum) = (
            c.read(od.ptr(), cols),
            c.read(yd.ptr(), rows),
            c.read(x2.ptr(), cols),
        );
        let other = Some(ops::Prepared {
            at: d.qx_slot(1),
            bits: if bits == 4 { 8 } else { 4 },
            qb: 0,
        });
        let x2 = add_norm([other, pre], u);
        proj.run_prepared(d, od.ptr(), yd.ptr(), pre).unwrap();
        assert_eq!(n0, c.read(od.ptr(), cols), "add_rmsnorm output, {what}");
        assert_eq!(sum, c.read(x2.ptr(), cols), "add_rmsnorm residual, {what}");
        assert_eq!(
            y0,
            c.read(yd.ptr(), rows),
            "add_rmsnorm-prepared product, {what}"
        );
        // The sum into another buffer (several blocks): the same sum, x left alone.
        let xo = d.upload_f32(&vec![f32::NAN; cols]).unwrap();
        let x2 = add_norm([pre, other], ops::Residual::Into(xo.ptr()));
        assert_eq!(sum, c.read(xo.ptr(), cols), "add_rmsnorm sum into, {what}");
        assert_eq!(
            x,
            c.read(x2.ptr(), cols),
            "add_rmsnorm into leaves x, {what}"
        );
        let n2 = c.read(od.ptr(), cols);
        assert!(max_abs(&n2, &n0) < 1e-5, "add_rmsnorm into output, {what}");
        let x2 = add_norm([pre, other], ops::Residual::Defer);
        let n1 = c.read(od.ptr(), cols);
        assert_eq!(
            x,
            c.read(x2.ptr(), cols),
            "deferred add_rmsnorm leaves x, {what}"
        );
        assert!(
            max_abs(&n1, &n0) < 1e-5,
            "deferred add_rmsnorm output, {what}"
        );
        proj.run_prepared(d, od.ptr(), yd.ptr(), pre).unwrap();
        let y1 = c.read(yd.ptr(), rows);
        proj.run(d, od.ptr(), yd.ptr()).unwrap();
        assert_eq!(
            y1,
            c.read(yd.ptr(), rows),
            "deferred-prepared product, {what}"
        );
        // SwiGLU -> three problems' products, each with its own prepared x.
        let np = 3;
        let gu = d.upload_f32(&rng.vec(2 * cols * np)).unwrap();
        let hd = d.alloc(cols * np * 4).unwrap();
        let ys = d.alloc(rows * np * 4).unwrap();
        let m = proj.single().unwrap();
        let probs: Vec<_> = (0..np as u64)
            .map(|j| {
                (
                    m.w,
                    m.s,
                    m.b,
                    hd.ptr() + j * cols as u64 * 4,
                    ys.ptr() + j * rows as u64 * 4,
                )
            })
            .collect();
        ops::swiglu(d, gu.ptr(), hd.ptr(), cols, np, None).unwrap();
        ops::matvec_batch(d, &d.compute, &m, &probs, 1, cols, rows).unwrap();
        let (h0, y0) = (c.read(hd.ptr(), cols * np), c.read(ys.ptr(), rows * np));
        let pre_h = Some(ops::Prepared {
            at: d.qx.ptr(),
            bits,
            qb: ops::qx_size(bits, cols),
        });
        ops::swiglu(d, gu.ptr(), hd.ptr(), cols, np, pre_h).unwrap();
        ops::matvec_batch_prepared(d, &d.compute, &m, &probs, 1, cols, rows, pre_h).unwrap();
        assert_eq!(h0, c.read(hd.ptr(), cols * np), "SwiGLU output, {what}");
        assert_eq!(
            y0,
            c.read(ys.ptr(), rows * np),
            "SwiGLU-prepared products, {what}"
        );
    }
    ops::set_affine_path(ops::AffinePath::Auto);
}

/// A random affine matrix (group 64) in VRAM and where its `mp` kernel's prepared x goes.
fn mp_matrix(
    d: &Device,
    rng: &mut Rng,
    bits: u32,
    rows: usize,
    cols: usize,
) -> (ops::Proj, ops::Prepared) {
    let w = affine(rng, bits, 64, rows, cols, DType::BF16);
    let proj = ops::Proj::new(d, &[(&w, 0, rows)]).unwrap();
    let pre = ops::Prepared {
        at: d.qx_slot(0),
        bits,
        qb: 0,
    };
    (proj, pre)
}

/// A random x, RMS-normalised (unit weights) and prepared at `pre` for the `mp` matvec.
fn normed_x(
    d: &Device,
    rng: &mut Rng,
    cols: usize,
    pre: ops::Prepared,
) -> flashmoe_cuda::device::DBuf {
    let xd = d.upload_f32(&rng.vec(cols)).unwrap();
    let nw = d.upload_f32(&vec![1.0; cols]).unwrap();
    let xn = d.alloc(cols * 4).unwrap();
    let (x, w, o) = (xd.ptr(), nw.ptr(), xn.ptr());
    ops::rmsnorm_rows(d, x, cols, w, o, cols, cols, 1, 1e-6, Some(pre)).unwrap();
    xn
}

/// The matvec epilogues against their plain twins, bit for bit: the in-projection with the
/// GatedDeltaNet conv of its first `cd` rows (`mpc`) against the product then `gdn_conv` (the
/// outputs, the conv outputs and the shifted state, two steps so the state feeds back), and
/// the head with the argmax (`mpa`) against the product then `argmax` (same key).
#[test]
fn matvec_epilogues_match_plain_twins_cuda() {
    let Some(c) = cuda() else { return };
    let d = &c.0;
    ops::set_affine_path(ops::AffinePath::Prepared);
    ops::set_epilogues(true);
    let mut rng = Rng(0x5eed_0003);
    for (bits, nk, dk, nv, dv, extra, cols, kconv) in [
        (4, 2, 32, 4, 32, 70, 512, 4),
        (8, 1, 64, 2, 64, 33, 256, 3),
        (2, 1, 32, 1, 32, 0, 256, 8),
    ] {
        let g = ops::GdnShape {
            nk,
            nv,
            dk,
            dv,
            kconv,
            eps: 1e-6,
        };
        let cd = g.conv_dim();
        let rows = cd + extra;
        let what = format!("{bits}-bit {rows}x{cols}, conv {cd} channels, {kconv} taps");
        let (proj, pre) = mp_matrix(d, &mut rng, bits, rows, cols);
        let m = proj.single().unwrap();
        let cw = d.upload_f32(&rng.vec(cd * kconv)).unwrap();
        let st0 = rng.vec(cd * (kconv - 1));
        let (sa, sb) = (d.upload_f32(&st0).unwrap(), d.upload_f32(&st0).unwrap());
        let (ua, ub) = (d.alloc(cd * 4).unwrap(), d.alloc(cd * 4).unwrap());
        let (ya, yb) = (d.alloc(rows * 4).unwrap(), d.alloc(rows * 4).unwrap());
        let epi = ops::Epilogue::Conv {
            state: sb.ptr(),
            w: cw.ptr(),
            u: ub.ptr(),
            cd,
            k: kconv,
        };
        assert!(
            ops::epilogue_fits(&m, Some(pre), &epi),
            "{what} takes the epilogue"
        );
        for step in 0..2 {
            let xn = normed_x(d, &mut rng, cols, pre);
            proj.run_prepared(d, xn.ptr(), ya.ptr(), Some(pre)).unwrap();
            ops::gdn_conv(d, &g, ya.ptr(), sa.ptr(), cw.ptr(), ua.ptr()).unwrap();
            ops::matvec_epilogue(d, &m, xn.ptr(), yb.ptr(), pre, epi).unwrap();
            let bits_of =
                |p: u64, n: usize| c.read(p, n).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits_of(ya.ptr(), rows),
                bits_of(yb.ptr(), rows),
                "outputs, {what}, step {step}"
            );
            assert_eq!(
                bits_of(ua.ptr(), cd),
                bits_of(ub.ptr(), cd),
                "conv outputs, {what}, step {step}"
            );
            let n = cd * (kconv - 1);
            assert_eq!(
                bits_of(sa.ptr(), n),
                bits_of(sb.ptr(), n),
                "conv state, {what}, step {step}"
            );
        }
    }
    // Argmax: heads of rows spread over several blocks and row groups.
    for (bits, rows, cols) in [(4, 5000, 512), (8, 700, 256), (4, 40000, 256)] {
        let (proj, pre) = mp_matrix(d, &mut rng, bits, rows, cols);
        let m = proj.single().unwrap();
        let xn = normed_x(d, &mut rng, cols, pre);
        let (y, ka, kb) = (
            d.alloc(rows * 4).unwrap(),
            d.alloc(8).unwrap(),
            d.alloc_zeros(8).unwrap(),
        );
        proj.run_prepared(d, xn.ptr(), y.ptr(), Some(pre)).unwrap();
        ops::argmax(d, y.ptr(), rows, ka.ptr()).unwrap();
        let want = c.read(ka.ptr(), 2);
        let epi = ops::Epilogue::Argmax { key: kb.ptr() };
        ops::matvec_epilogue(d, &m, xn.ptr(), y.ptr(), pre, epi).unwrap();
        let got = c.read(kb.ptr(), 2);
        let idx =
            |k: &[f32]| ops::argmax_index((k[1].to_bits() as u64) << 32 | k[0].to_bits() as u64);
        assert_eq!(
            idx(&got),
            idx(&want),
            "argmax index, {bits}-bit {rows} rows"
        );
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "argmax key, {bits}-bit {rows} rows"
        );
    }
    ops::set_affine_path(ops::AffinePath::Auto);
}

/// The whole token with and without the epilogues (conv in the in-projection, argmax in the
/// head, x prepared by its producers) on `Model<Cuda>`: the same logits (within float
/// rounding: a producer's prepared x and `quant_x3`'s are compared by NMSE in tests/backend.rs)
/// on tiny-a MLX 4-bit with every expert resident, the same greedy tokens, and the head's
/// argmax epilogue seen in the trace.
#[test]
fn epilogues_leave_the_token_unchanged_cuda() {
    use flashmoe_core::model::ForwardStats;
    use flashmoe_cuda::Cuda;
    use std::sync::Arc;
    let Some(_) = cuda() else { return };
    let Some(shared) = shared_dir() else { return };
    let gdir = shared.join("golden").join("tiny-a");
    let model =
        Arc::new(open_model(&gdir.join("mlx-4bit"), &LoadOptions::default()).expect("load model"));
    let ids: Vec<u32> = golden(&gdir).i64s["mlx4_input_ids"]
        .iter()
        .map(|&x| x as u32)
        .collect();
    let run = |on: bool| {
        ops::set_epilogues(on);
        let m = Cuda::load(model.clone(), 0).expect("model on CUDA");
        assert!(Cuda::preload(&m).expect("preload"), "every layer resident");
        let mut fs = ForwardStats::default();
        let mut st = m.new_state().unwrap();
        let n = ids.len() - 1;
        let mut logits = m
            .forward(&ids[..n], &mut st, Logits::All, &mut fs, None)
            .unwrap();
        logits.extend(
            m.forward(&ids[n..], &mut st, Logits::Last, &mut fs, None)
                .unwrap(),
        );
        let mut st = m.new_state().unwrap();
        let mut greedy = vec![m.forward_argmax(&ids, &mut st).unwrap()];
        let dev = m.be.device();
        let start = dev.trace_start().unwrap();
        greedy.push(m.forward_argmax(&[greedy[0]], &mut st).unwrap());
        let (trace, _) = dev.trace_finish(&start).unwrap();
        greedy.push(m.forward_argmax(&[greedy[1]], &mut st).unwrap());
        let names: Vec<String> = trace.iter().map(|k| k.kernel.clone()).collect();
        (logits, greedy, names)
    };
    let (l0, g0, n0) = run(false);
    let (l1, g1, n1) = run(true);
    ops::set_epilogues(true);
    eprintln!("plain launches {n0:?}\nwith epilogues {n1:?}");
    // A stale or wrong prepared x, or a wrong epilogue, is an error of order 1; float
    // rounding between the two paths is orders of magnitude under the bound.
    let e = nmse(&l1, &l0);
    eprintln!("logits with and without the epilogues: NMSE {e:.2e}");
    assert!(e < 1e-6, "logits with and without the epilogues: NMSE {e}");
    assert_eq!(g0, g1, "greedy tokens with and without the epilogues");
    let has = |n: &[String], s: &str| n.iter().any(|k| k.ends_with(s));
    assert!(
        has(&n1, "_mpa") && !has(&n0, "_mpa"),
        "the head's argmax epilogue ran"
    );
    assert!(
        has(&n0, "argmax_f32") && !has(&n1, "argmax_f32"),
        "no argmax launch with it"
    );
    // The conv runs in the in-projection's epilogue only where q|k|v|z|b|a are one stacked
    // matrix: tiny-a's are not (b's scales would start 8 bytes off the 16-byte alignment the
    // kernels load at), so here the conv may stay its own launch with the epilogues on; where
    // they stack, tests/backend.rs (`fused_ops_launch_the_fused_kernels`) checks `_mpc` runs.
    assert!(!has(&n0, "_mpc"), "no conv epilogue with the epilogues off");
    if has(&n1, "_mpc") {
        assert!(
            !has(&n1, "gdn_conv") && !has(&n1, "gdn_conv_rows"),
            "the conv ran in the epilogue and again on its own"
        );
    }
}

fn matmul_body(dev: &dyn TestDev) {
    let mut rng = Rng(0xfeed_beef);
    let w = affine(&mut rng, 4, 64, 70, 512, DType::BF16);
    for n in [2, 8, 11] {
        check_product(dev, &w, n, &mut rng, "4-bit g64 bf16 70x512");
    }
    let w = dense(&mut rng, DType::BF16, 33, 264);
    check_product(dev, &w, 11, &mut rng, "dense bf16 33x264");
}
test_device!(matmul_body, matmul_cpu, matmul_cuda);

fn elementwise_body(dev: &dyn TestDev) {
    let mut rng = Rng(42);
    // Several rows (one block each), and one row split over blocks (a ragged last slice too).
    for (rows, n) in [(3, 200), (1, 4096), (1, 1000)] {
        let x: Vec<f32> = rng.vec(rows * n).iter().map(|v| v * 3.0).collect();
        let w = rng.vec(n);
        let got = dev.rmsnorm(&x, &w, rows, 1e-6);
        let mut want = vec![0f32; rows * n];
        for r in 0..rows {
            // f64 twin of RMSNorm.
            let xr = &x[r * n..(r + 1) * n];
            let ms: f64 = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for i in 0..n {
                want[r * n + i] = (xr[i] as f64 * inv * w[i] as f64) as f32;
            }
        }
        let e = nmse(&got, &want);
        assert!(e < 1e-10, "{}: rmsnorm {rows}x{n} nmse {e:.3e}", dev.name());
    }

    let g: Vec<f32> = rng.vec(500).iter().map(|v| v * 8.0).collect();
    let u = rng.vec(500);
    let got = dev.swiglu(&g, &u);
    let want: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| ((*g as f64 / (1.0 + (-*g as f64).exp())) * *u as f64) as f32)
        .collect();
    let e = nmse(&got, &want);
    assert!(e < 1e-10, "{}: swiglu nmse {e:.3e}", dev.name());

    // Greedy pick: ties go to the first index, NaN never wins, negative values order right.
    for (n, levels) in [(248_320, 7), (1000, 0), (5, 2)] {
        let mut x: Vec<f32> = rng
            .vec(n)
            .iter()
            .map(|v| match levels {
                0 => v * 4.0 - 10.0,
                l => (v * l as f32).floor(),
            })
            .collect();
        x[n / 3] = f32::NAN;
        let want = (0..n)
            .filter(|&i| !x[i].is_nan())
            .max_by(|&a, &b| x[a].partial_cmp(&x[b]).unwrap().then(b.cmp(&a)))
            .unwrap();
        assert_eq!(dev.argmax(&x), want, "{}: argmax of {n}", dev.name());
    }

    for (e_, k, levels) in [
        (16, 4, 0),
        (37, 5, 0),
        (512, 10, 0),
        (64, 8, 3),
        (1500, 10, 5),
    ] {
        // levels > 0: logits on a few values, so ties are decided by the lower index.
        let logits: Vec<f32> = rng
            .vec(e_)
            .iter()
            .map(|v| match levels {
                0 => v * 4.0,
                n => (v * n as f32).floor(),
            })
            .collect();
        let (ids, wts) = dev.topk(&logits, k);
        // f64 twin: softmax, stable sort by (-p, index), renormalise.
        let m = logits.iter().fold(f64::MIN, |a, b| a.max(*b as f64));
        let p: Vec<f64> = logits.iter().map(|v| (*v as f64 - m).exp()).collect();
        let mut order: Vec<usize> = (0..e_).collect();
        order.sort_by(|a, b| p[*b].partial_cmp(&p[*a]).unwrap().then(a.cmp(b)));
        let sel = &order[..k];
        let s: f64 = sel.iter().map(|i| p[*i]).sum();
        assert_eq!(ids, sel, "{}: top-k ids", dev.name());
        for (w, i) in wts.iter().zip(sel) {
            assert!(
                (*w as f64 - p[*i] / s).abs() < 1e-5,
                "{}: top-k weight",
                dev.name()
            );
        }
    }
}
test_device!(elementwise_body, elementwise_cpu, elementwise_cuda);

/// The shared reference data (checked only after a device was found, so CI skips first).
fn shared_dir() -> Option<PathBuf> {
    flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))
}

fn golden(dir: &std::path::Path) -> Golden {
    Golden::load(dir)
}

/// The bound of the session test (the decode products of affine matrices read x quantised to
/// int8 levels, the `mp` kernels). The golden logits of every fixture on `Model<Cuda>`, with
/// every expert resident and through an evicting tier over a pinned host tier, are checked by
/// tests/backend.rs (`golden_fixtures_on_cuda`, `session_on_model_cuda_tiers`).
const GOLDEN_TOL: f32 = 2e-3;

#[test]
fn no_device_is_a_clear_error() {
    if flashmoe_cuda::device_available() {
        return;
    }
    let e = Device::new(0).err().expect("no device here");
    assert!(e.to_string().starts_with("no CUDA device"), "{e}");
}

/// The engine's path: a `Session` on a backend (CUDA: `CudaSeq`, core's `ModelSeq<Cuda>`) over tiny-a, against a CPU
/// `Session` and the golden logits: one prompt, prefill then step by step, prefix reuse from a
/// saved snapshot (device-to-device copies on CUDA), and the session's token checks. The CPU
/// case checks the test itself where there is no GPU.
fn session_case(
    name: &str,
    make: impl Fn(std::sync::Arc<flashmoe_core::model::Model>) -> Box<dyn SeqBackend>,
) {
    use flashmoe_core::session::Session;
    use std::sync::Arc;
    let Some(shared) = shared_dir() else { return };
    let gdir = shared.join("golden").join("tiny-a");
    let g = golden(&gdir);
    let model =
        Arc::new(open_model(&gdir.join("hf-bf16"), &LoadOptions::default()).expect("load model"));
    let ids: Vec<u32> = g.i64s["input_ids"].iter().map(|&x| x as u32).collect();
    let (shape, want) = &g.f32s["logits"];
    let vocab = shape[1];
    let p = g.meta["bf16"]["prompt_len"].as_u64().expect("prompt_len") as usize;
    let (_, dec) = &g.f32s["decode_logits"];
    let mut gpu = Session::with_backend(model.clone(), make(model.clone()));
    let mut cpu = Session::new(model.clone());
    assert_eq!((gpu.backend_name(), cpu.backend_name()), (name, "cpu"));
    let check = |what: &str, got: &[f32], cpu: &[f32], gold: &[f32]| {
        let (e_cpu, e_gold) = (max_abs(got, cpu), max_abs(got, gold));
        eprintln!("{name} session {what}: vs cpu {e_cpu:.2e}, vs golden {e_gold:.2e}");
        assert!(
            e_cpu < GOLDEN_TOL && e_gold < GOLDEN_TOL,
            "{what}: {e_cpu} {e_gold}"
        );
    };
    // Golden logits after token `i`: the decode run's where it has them, else the prompt's.
    let row = |i: usize| -> &[f32] {
        match (i + 1).checked_sub(p) {
            Some(j) if (j + 1) * vocab <= dec.len() => &dec[j * vocab..(j + 1) * vocab],
            _ => &want[i * vocab..(i + 1) * vocab],
        }
    };
    let last = row(ids.len() - 1);
    // One prompt.
    let (l, reused) = gpu.set_prompt(&ids).expect("prompt");
    let (lc, _) = cpu.set_prompt(&ids).expect("prompt");
    assert_eq!(reused, 0);
    check("one prompt", &l, &lc, last);
    assert!(gpu.state_bytes() > 0);

    // Prefill p tokens, then step by step.
    gpu.reset();
    cpu.reset();
    let l = gpu.feed(&ids[..p]).expect("prefill").to_vec();
    let lc = cpu.feed(&ids[..p]).expect("prefill").to_vec();
    check("prefill", &l, &lc, row(p - 1));
    gpu.snapshot();
    cpu.snapshot();
    for (j, &id) in ids[p..].iter().enumerate() {
        let l = gpu.step(id).expect("decode").to_vec();
        let lc = cpu.step(id).expect("decode").to_vec();
        check(&format!("step {j}"), &l, &lc, row(p + j));
    }
    assert_eq!(gpu.tokens(), &ids[..]);

    // Diverge, then come back: the snapshot after `p` tokens is restored (twice: restoring
    // copies, so the snapshot stays intact), and only the rest is prefilled.
    for round in 0..2 {
        let other = (ids[0] + 1) % vocab as u32;
        gpu.set_prompt(&[other]).expect("diverge");
        cpu.set_prompt(&[other]).expect("diverge");
        let (l, reused) = gpu.set_prompt(&ids).expect("reuse");
        let (lc, reused_cpu) = cpu.set_prompt(&ids).expect("reuse");
        assert_eq!((reused, reused_cpu), (p, p), "round {round}");
        check(&format!("prefix reuse {round}"), &l, &lc, last);
    }

    // The session's checks hold for every backend.
    let e = gpu.feed(&[vocab as u32]).expect_err("out of vocabulary");
    assert!(
        matches!(e, flashmoe_core::Error::TokenOutOfRange { .. }),
        "{e}"
    );
    let long = vec![ids[0]; model.cfg.max_position_embeddings + 1];
    let e = gpu.set_prompt(&long).expect_err("too long");
    assert!(
        matches!(e, flashmoe_core::Error::ContextOverflow { .. }),
        "{e}"
    );
}

#[test]
fn session_tiny_a_cpu() {
    session_case("cpu", |m| {
        Box::new(flashmoe_core::session::CpuBackend::new(m))
    });
}

#[test]
fn session_tiny_a_cuda() {
    if cuda().is_none() {
        return;
    }
    session_case("cuda", |m| {
        Box::new(flashmoe_cuda::seq::open(m, &CudaOptions::default()).expect("CUDA backend"))
    });
}
