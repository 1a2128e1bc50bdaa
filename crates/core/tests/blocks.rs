//! Each block of the forward pass against a plain reference written here from arch-spec.md,
//! on random weights: gated attention (with partial RoPE as complex rotation, GQA, causal
//! softmax), GatedDeltaNet (conv, l2norm, delta rule in f64), and MoE routing + combine.
//! Also: processing a sequence at once equals processing it in pieces through the state.
use flashmoe_core::backend::conformance::MemExperts;
use flashmoe_core::buf::Buf;
use flashmoe_core::config::ModelConfig;
use flashmoe_core::experts::{ExpertCounters, ExpertWeights};
use flashmoe_core::model::attention::Attention;
use flashmoe_core::model::gdn::{GatedDeltaNet, GdnProj};
use flashmoe_core::model::moe::{Mlp, Moe};
use flashmoe_core::model::LayerTimes;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn cfg() -> ModelConfig {
    let v = serde_json::json!({
        "model_type": "qwen3_5_moe_text", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
        "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4,
        "num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 10,
        "shared_expert_intermediate_size": 14, "vocab_size": 50, "rms_norm_eps": 1e-6
    });
    ModelConfig::from_json(&v, std::path::Path::new("test-config")).unwrap()
}

fn randv(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-s..s)).collect()
}

fn lin(rng: &mut StdRng, rows: usize, cols: usize) -> (Linear, Vec<f32>) {
    let w = randv(rng, rows * cols, 0.3);
    (
        Linear::Dense {
            dtype: DType::F32,
            rows,
            cols,
            data: Buf::from_vec(&w),
        },
        w,
    )
}

fn mv(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                .sum()
        })
        .collect()
}

fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * *w as f64).collect()
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max);
    assert!(err < tol, "{what}: max abs err {err}");
}

#[test]
fn attention_matches_plain_reference_and_decodes_incrementally() {
    let c = cfg();
    let mut rng = StdRng::seed_from_u64(1);
    let (h, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
    let (q_proj, wq) = lin(&mut rng, nh * hd * 2, h);
    let (k_proj, wk) = lin(&mut rng, nkv * hd, h);
    let (v_proj, wv) = lin(&mut rng, nkv * hd, h);
    let (o_proj, wo) = lin(&mut rng, h, nh * hd);
    let qn: Vec<f32> = randv(&mut rng, hd, 0.5).iter().map(|v| 1.0 + v).collect();
    let kn: Vec<f32> = randv(&mut rng, hd, 0.5).iter().map(|v| 1.0 + v).collect();
    let att = Attention {
        q_proj,
        k_proj,
        v_proj,
        o_proj,
        q_norm: qn.clone(),
        k_norm: kn.clone(),
    };
    let t = 7;
    let x = randv(&mut rng, t * h, 1.0);

    // Reference: per token, per head; RoPE as rotation of complex pairs (d, d + rot/2).
    let rot = c.rotary_dim;
    let rope = |v: &mut [f64], pos: usize| {
        for d in 0..rot / 2 {
            let inv = 1.0 / c.rope_theta.powf(2.0 * d as f64 / rot as f64);
            let (re, im) = (v[d], v[d + rot / 2]);
            let (s, co) = (pos as f64 * inv).sin_cos();
            v[d] = re * co - im * s;
            v[d + rot / 2] = re * s + im * co;
        }
    };
    let mut ks = Vec::new();
    let mut vs = Vec::new();
    let mut want = Vec::new();
    for ti in 0..t {
        let xt = &x[ti * h..][..h];
        let qg = mv(&wq, nh * hd * 2, h, xt);
        let k = mv(&wk, nkv * hd, h, xt);
        let v = mv(&wv, nkv * hd, h, xt);
        let mut kh_all = Vec::new();
        for g in 0..nkv {
            let mut kk = rms(&k[g * hd..][..hd], &kn, 1e-6);
            rope(&mut kk, ti);
            kh_all.push(kk);
        }
        ks.push(kh_all);
        vs.push(
            (0..nkv)
                .map(|g| v[g * hd..][..hd].to_vec())
                .collect::<Vec<_>>(),
        );
        let mut o = vec![0f64; nh * hd];
        for hh in 0..nh {
            let mut q = rms(&qg[hh * 2 * hd..][..hd], &qn, 1e-6);
            rope(&mut q, ti);
            let gate = &qg[hh * 2 * hd + hd..][..hd];
            let g = hh / (nh / nkv);
            let sc: Vec<f64> = (0..=ti)
                .map(|s| {
                    q.iter().zip(&ks[s][g]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = (0..=ti).map(|s| e[s] / z * vs[s][g][d]).sum();
                o[hh * hd + d] = acc * sig(gate[d]);
            }
        }
        let of: Vec<f32> = o.iter().map(|v| *v as f32).collect();
        want.extend(mv(&wo, h, nh * hd, &of));
    }

    let (mut kc, mut vc) = (Vec::new(), Vec::new());
    let got = att.forward(&c, &x, t, 0, &mut kc, &mut vc).unwrap();
    close(&got, &want, 1e-4, "attention, whole sequence");

    let (mut kc, mut vc) = (Vec::new(), Vec::new());
    let mut stepped = att
        .forward(&c, &x[..3 * h], 3, 0, &mut kc, &mut vc)
        .unwrap();
    for ti in 3..t {
        stepped.extend(
            att.forward(&c, &x[ti * h..][..h], 1, ti, &mut kc, &mut vc)
                .unwrap(),
        );
    }
    close(&stepped, &want, 1e-4, "attention, prefill 3 then decode");
}

#[test]
fn gated_delta_net_matches_plain_reference_and_carries_state() {
    let c = cfg();
    let mut rng = StdRng::seed_from_u64(2);
    let h = c.hidden_size;
    let (nk, nv, dk, dv, kk) = (
        c.linear_num_key_heads,
        c.linear_num_value_heads,
        c.linear_key_head_dim,
        c.linear_value_head_dim,
        c.linear_conv_kernel_dim,
    );
    let cd = c.gdn_conv_dim();
    let (qkv, wqkv) = lin(&mut rng, cd, h);
    let (z, wz) = lin(&mut rng, nv * dv, h);
    let (b, wb) = lin(&mut rng, nv, h);
    let (a, wa) = lin(&mut rng, nv, h);
    let (out, wout) = lin(&mut rng, h, nv * dv);
    let conv_w = randv(&mut rng, cd * kk, 0.5);
    let dt_bias = randv(&mut rng, nv, 0.5);
    let a_log = randv(&mut rng, nv, 1.0);
    let norm_w: Vec<f32> = randv(&mut rng, dv, 0.3).iter().map(|v| 1.0 + v).collect();
    let gdn = GatedDeltaNet {
        proj: GdnProj { qkv, z, b, a },
        conv_w: conv_w.clone(),
        dt_bias: dt_bias.clone(),
        neg_a: a_log.iter().map(|v| -v.exp()).collect(),
        norm_w: norm_w.clone(),
        out_proj: out,
    };
    let t = 9;
    let x = randv(&mut rng, t * h, 1.0);

    // Reference (arch-spec §6.3-6.7), f64.
    let mixed: Vec<Vec<f64>> = (0..t)
        .map(|ti| mv(&wqkv, cd, h, &x[ti * h..][..h]))
        .collect();
    let silu = |v: f64| v * sig(v);
    let mut s = vec![vec![vec![0f64; dv]; dk]; nv];
    let mut want = Vec::new();
    for ti in 0..t {
        let u: Vec<f64> = (0..cd)
            .map(|ch| {
                let acc: f64 = (0..kk)
                    .map(|j| {
                        let src = ti as isize - (kk - 1) as isize + j as isize;
                        if src < 0 {
                            0.0
                        } else {
                            conv_w[ch * kk + j] as f64 * mixed[src as usize][ch]
                        }
                    })
                    .sum();
                silu(acc)
            })
            .collect();
        let xt = &x[ti * h..][..h];
        let zt = mv(&wz, nv * dv, h, xt);
        let bt = mv(&wb, nv, h, xt);
        let at = mv(&wa, nv, h, xt);
        let l2 = |v: &[f64]| {
            let r = 1.0 / (v.iter().map(|x| x * x).sum::<f64>() + 1e-6).sqrt();
            v.iter().map(|x| x * r).collect::<Vec<f64>>()
        };
        let mut y = vec![0f32; nv * dv];
        for hh in 0..nv {
            let kh = hh / (nv / nk);
            let q: Vec<f64> = l2(&u[kh * dk..][..dk])
                .iter()
                .map(|v| v / (dk as f64).sqrt())
                .collect();
            let k = l2(&u[nk * dk + kh * dk..][..dk]);
            let v = &u[2 * nk * dk + hh * dv..][..dv];
            let beta = sig(bt[hh]);
            let sp = at[hh] + dt_bias[hh] as f64;
            let sp = if sp > 20.0 { sp } else { sp.exp().ln_1p() };
            let g = -(a_log[hh] as f64).exp() * sp;
            let st = &mut s[hh];
            for row in st.iter_mut() {
                for e in row.iter_mut() {
                    *e *= g.exp();
                }
            }
            let kv: Vec<f64> = (0..dv)
                .map(|j| (0..dk).map(|i| st[i][j] * k[i]).sum())
                .collect();
            let delta: Vec<f64> = (0..dv).map(|j| (v[j] - kv[j]) * beta).collect();
            for i in 0..dk {
                for j in 0..dv {
                    st[i][j] += k[i] * delta[j];
                }
            }
            let o: Vec<f64> = (0..dv)
                .map(|j| (0..dk).map(|i| st[i][j] * q[i]).sum())
                .collect();
            let n = rms(&o, &norm_w, 1e-6);
            for j in 0..dv {
                y[hh * dv + j] = (n[j] * silu(zt[hh * dv + j])) as f32;
            }
        }
        want.extend(mv(&wout, h, nv * dv, &y));
    }

    let new_state = || (vec![0f32; (kk - 1) * cd], vec![0f32; nv * dk * dv]);
    let (mut conv, mut st) = new_state();
    let got = gdn.forward(&c, &x, t, &mut conv, &mut st).unwrap();
    close(&got, &want, 1e-4, "gdn, whole sequence");

    let (mut conv, mut st) = new_state();
    let mut pieces = gdn.forward(&c, &x[..2 * h], 2, &mut conv, &mut st).unwrap();
    pieces.extend(
        gdn.forward(&c, &x[2 * h..5 * h], 3, &mut conv, &mut st)
            .unwrap(),
    );
    for ti in 5..t {
        pieces.extend(
            gdn.forward(&c, &x[ti * h..][..h], 1, &mut conv, &mut st)
                .unwrap(),
        );
    }
    close(&pieces, &want, 1e-4, "gdn, in pieces through the state");
}

#[test]
fn moe_matches_plain_reference() {
    let c = cfg();
    let mut rng = StdRng::seed_from_u64(3);
    let (h, e, i, si) = (
        c.hidden_size,
        c.num_experts,
        c.moe_intermediate_size,
        c.shared_expert_intermediate_size,
    );
    let (router, wr) = lin(&mut rng, e, h);
    let mut raw = Vec::new();
    let mut experts = Vec::new();
    for _ in 0..e {
        let (g, wg) = lin(&mut rng, i, h);
        let (u, wu) = lin(&mut rng, i, h);
        let (d, wd) = lin(&mut rng, h, i);
        experts.push(ExpertWeights {
            gate: g,
            up: u,
            down: d,
        });
        raw.push((wg, wu, wd));
    }
    let (sg, wsg) = lin(&mut rng, si, h);
    let (su, wsu) = lin(&mut rng, si, h);
    let (sd, wsd) = lin(&mut rng, h, si);
    let (sgate, wsgate) = lin(&mut rng, 1, h);
    let moe = Moe {
        router,
        shared: Some(Mlp {
            gate: sg,
            up: su,
            down: sd,
        }),
        shared_gate: Some(sgate),
        layer: 0,
    };
    let src = MemExperts {
        experts,
        counters: ExpertCounters::default(),
    };
    let t = 5;
    let x = randv(&mut rng, t * h, 1.0);
    let swiglu = |wg: &[f32], wu: &[f32], wd: &[f32], inter: usize, xt: &[f32]| -> Vec<f64> {
        let g = mv(wg, inter, h, xt);
        let u = mv(wu, inter, h, xt);
        let hid: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| (g * sig(*g) * u) as f32)
            .collect();
        mv(wd, h, inter, &hid)
    };
    for k in [c.num_experts_per_tok, 1, e] {
        let mut want = Vec::new();
        for ti in 0..t {
            let xt = &x[ti * h..][..h];
            let logits = mv(&wr, e, h, xt);
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let p: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f64 = p.iter().sum();
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|a, b| p[*b].partial_cmp(&p[*a]).unwrap());
            let top = &idx[..k];
            let sum: f64 = top.iter().map(|&j| p[j] / z).sum();
            let mut y = vec![0f64; h];
            for &j in top {
                let w = p[j] / z / sum;
                let (wg, wu, wd) = &raw[j];
                for (a, b) in y.iter_mut().zip(swiglu(wg, wu, wd, i, xt)) {
                    *a += w * b;
                }
            }
            let gate = sig(mv(&wsgate, 1, h, xt)[0]);
            for (a, b) in y.iter_mut().zip(swiglu(&wsg, &wsu, &wsd, si, xt)) {
                *a += gate * b;
            }
            want.extend(y);
        }
        let mut times = LayerTimes::default();
        let got = moe.forward(&x, t, h, k, true, &src, &mut times).unwrap();
        close(&got, &want, 1e-4, &format!("moe k={k}"));
    }
}
