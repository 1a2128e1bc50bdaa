//! Fault injection on model files through the binary: what a user sees (exit status, message,
//! what is left on disk) when a checkpoint's config is absurd, `pack --force` points at the
//! wrong directory, the disk fills or a signal arrives during a pack, dense weights are
//! flipped, or the weights hold NaN. Never a panic, a 0 exit on garbage, or a directory that
//! looks like a complete model and is not. Engine-level cases (every manifest number, every
//! config bound, damaged files) are in crates/core/tests/faults_packed.rs; Ctrl-C during a
//! pack is in pack_cli.rs.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// `OUT.partial`.
fn partial(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", out.display()))
}

/// A `synth --preset tiny` model (2 layers, 16 experts) at `dir`, with `extra` arguments.
fn synth_tiny(dir: &Path, extra: &[&str]) {
    run_ok(
        bin()
            .args(["synth", "--preset", "tiny", "--layers", "2", "--out"])
            .arg(dir)
            .args(extra),
    );
}

fn run_ids(model: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["run", "--ids", "1,2,3", "--tokens", "3", "--model"])
        .arg(model)
        .args(extra);
    c
}

#[test]
fn pack_refuses_what_run_refuses_before_writing_anything() {
    // pack returned 0 on these configs (or aborted on the allocation), and the model it wrote
    // was refused by `run` only afterwards: hours later on a large model.
    let Some(shared) = shared_dir() else { return };
    let ckpt = shared.join("golden/tiny-a/hf-bf16");
    let tmp = temp_dir("faults-pack-config");
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        ckpt.join("model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    let base = read_json(&ckpt.join("config.json"));
    let cases: &[(&str, Value, &str)] = &[
        // The embedding has 1000 rows.
        ("vocab_size", json!(1001), "embed_tokens"),
        (
            "linear_conv_kernel_dim",
            json!(1_000_000_000),
            "linear_conv_kernel_dim",
        ),
        (
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings",
        ),
        ("num_experts", json!(1099511627776u64), "num_experts"),
        // The checkpoint has experts 0 to 15.
        ("num_experts", json!(17), "experts.16"),
        ("moe_intermediate_size", json!(128), "expert"),
        (
            "shared_expert_intermediate_size",
            json!(64),
            "shared_expert",
        ),
    ];
    let out = tmp.join("out");
    for (field, value, word) in cases {
        let mut c = base.clone();
        c["text_config"][*field] = value.clone();
        write_json(&src.join("config.json"), &c);
        let err = run_err(
            bin()
                .args(["pack", "--from"])
                .arg(&src)
                .arg("--out")
                .arg(&out),
        );
        assert!(err.contains(word), "pack, {field} = {value}: {err}");
        assert!(
            !out.exists() && !partial(&out).exists(),
            "pack wrote output for {field} = {value} before refusing"
        );
        // `run` refuses the checkpoint with the same check.
        let err = run_err(&mut run_ids(&src, &[]));
        assert!(err.contains(word), "run, {field} = {value}: {err}");
    }
    // A checkpoint has nothing --verify could check: said, not implied.
    write_json(&src.join("config.json"), &base);
    let o = run_ok(&mut run_ids(&src, &["--verify"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note:") && err.contains("no checksums"),
        "{err}"
    );
}

#[test]
fn pack_force_replaces_only_a_packed_model() {
    // `pack --force` deleted any non-empty directory given as --out.
    let Some(shared) = shared_dir() else { return };
    let src = shared.join("golden/tiny-a/hf-bf16");
    let tmp = temp_dir("faults-pack-force");
    let pack = |out: &Path| {
        let mut c = bin();
        c.args(["pack", "--force", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(out);
        c
    };
    let home = tmp.join("home");
    std::fs::create_dir_all(home.join("sub")).unwrap();
    write(&home.join("notes.txt"), "keep me");
    // Remains of a model without its manifest are not a model either.
    write(&home.join("dense.bin"), "x");
    let err = run_err(&mut pack(&home));
    assert!(
        err.contains("holds no flashmoe packed model") && err.contains("even with --force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert!(home.join("sub").is_dir() && !partial(&home).exists());
    // A file in place of the output directory.
    let file = tmp.join("file");
    write(&file, "keep me too");
    let err = run_err(&mut pack(&file));
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me too");
    // A manifest.json that is not a flashmoe manifest does not make a model.
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    write(
        &other.join("manifest.json"),
        r#"{"format": "something-else"}"#,
    );
    run_err(&mut pack(&other));
    assert!(other.join("manifest.json").is_file());
    // An empty directory and a packed model are replaced.
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    run_ok(&mut pack(&empty));
    run_ok(&mut pack(&empty));
    assert!(empty.join("manifest.json").is_file());
}

/// Runs `flashmoe ARGS` under bash with a file size limit of `blocks` KiB (bash counts 1024-byte
/// blocks) and SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk.
fn with_file_limit(blocks: u64, args: &[&str]) -> std::process::Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "trap '' XFSZ; ulimit -f {blocks}; exec '{}' {}",
        env!("CARGO_BIN_EXE_flashmoe"),
        quoted.join(" ")
    );
    Command::new("bash").args(["-c", &script]).output().unwrap()
}

#[test]
fn a_full_disk_during_pack_or_synth_fails_clearly_and_leaves_nothing() {
    let Some(shared) = shared_dir() else { return };
    let src = shared.join("golden/tiny-a/hf-bf16");
    let tmp = temp_dir("faults-full-disk");
    let out = tmp.join("m");
    let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
    // pack with dense kept bf16: its dense.bin (2.8 MB) is its largest file, so the limit hits
    // it first, at its first write (8 KiB) or part-way (2000 KiB).
    for blocks in [8, 2000] {
        let o = with_file_limit(
            blocks,
            &[
                "pack",
                "--dense-bits",
                "16",
                "--from",
                src_s,
                "--out",
                out_s,
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains("write failed") && err.contains("dense.bin") && !err.contains("panicked"),
            "{err}"
        );
        assert!(
            !out.exists() && !partial(&out).exists(),
            "left behind: {err}"
        );
    }
    // synth, same writer: 16-bit experts (768 KB per layer file) over 4-bit dense weights
    // (184 KB) fail in an expert file once dense.bin is complete.
    let o = with_file_limit(
        600,
        &[
            "synth", "--preset", "tiny", "--layers", "2", "--bits", "16", "--out", out_s,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("write failed") && err.contains("layer_000.bin"),
        "{err}"
    );
    assert!(
        !out.exists() && !partial(&out).exists(),
        "left behind: {err}"
    );
}

#[test]
fn sigterm_during_pack_leaves_the_old_model_and_nothing_that_looks_complete() {
    // SIGTERM keeps its default action (Ctrl-C is caught and cleans up, see pack_cli.rs): the
    // process ends at once, OUT.partial stays without a manifest, so it never loads as a model,
    // the previous OUT is untouched, and the next pack clears the remains.
    let Some(shared) = shared_dir() else { return };
    let src = shared.join("golden/tiny-a/hf-bf16");
    let tmp = temp_dir("faults-sigterm");
    let out = tmp.join("m");
    let pack = |extra: &[&str]| {
        let mut c = bin();
        c.args(["pack", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&out)
            .args(extra);
        c
    };
    run_ok(&mut pack(&[]));
    let old = std::fs::read(out.join("manifest.json")).unwrap();
    let mut child = pack(&["--force", "--bits", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !partial(&out).exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "pack ended before it could be signalled"
        );
        assert!(t0.elapsed().as_secs() < 60, "pack never started writing");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "pack finished despite SIGTERM");
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), old);
    assert!(!partial(&out).join("manifest.json").exists());
    let err = run_err(&mut run_ids(&partial(&out), &[]));
    assert!(err.contains("incomplete"), "{err}");
    run_ok(&mut pack(&["--force", "--bits", "2"]));
    assert!(!partial(&out).exists());
    run_ok(&mut run_ids(&out, &[]));
}

#[test]
fn flipped_dense_bytes_fail_verify_and_old_models_say_what_is_unchecked() {
    // dense.bin had no checksums: flipped bytes changed the output even with --verify.
    let tmp = temp_dir("faults-dense-verify");
    let m = tmp.join("m");
    synth_tiny(&m, &[]);
    let man = read_json(&m.join("manifest.json"));
    let t = man["dense"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "lm_head.scales")
        .unwrap();
    let dense = m.join("dense.bin");
    let mut b = std::fs::read(&dense).unwrap();
    b[t["offset"].as_u64().unwrap() as usize] ^= 0x10;
    std::fs::write(&dense, &b).unwrap();
    run_ok(&mut run_ids(&m, &[]));
    let err = run_err(&mut run_ids(&m, &["--verify"]));
    assert!(
        err.contains("checksum mismatch") && err.contains("lm_head.scales"),
        "{err}"
    );

    // A model of format version 1 (no dense checksums) still runs with --verify, and says
    // what it could not check.
    let p = m.join("manifest.json");
    let mut v1 = read_json(&p);
    v1["format_version"] = json!(1);
    for t in v1["dense"]["tensors"].as_array_mut().unwrap() {
        t.as_object_mut().unwrap().remove("crc32");
    }
    write_json(&p, &v1);
    let o = run_ok(&mut run_ids(&m, &["--verify"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note:") && err.contains("format version 1") && err.contains("experts only"),
        "{err}"
    );

    // A manifest number of 0 is an error through the binary too, not a panic.
    let mut bad = v1.clone();
    bad["experts"]["group_size"] = json!(0);
    write_json(&p, &bad);
    let err = run_err(&mut run_ids(&m, &[]));
    assert!(err.contains("group_size 0"), "{err}");
}

#[test]
fn nan_weights_end_generation_with_an_error_not_token_zero() {
    // NaN expert scales gave `0,0,0` (run --ids) or `!!!!` (a prompt) and exit 0.
    let tmp = temp_dir("faults-nan");
    let m = tmp.join("m");
    synth_tiny(&m, &[]);
    let man = read_json(&m.join("manifest.json"));
    let x = &man["experts"];
    let stride = x["stride"].as_u64().unwrap() as usize;
    let layer = m.join(x["layers"][1]["file"].as_str().unwrap());
    let mut b = std::fs::read(&layer).unwrap();
    for e in 0..x["count"].as_u64().unwrap() as usize {
        for p in x["parts"].as_array().unwrap() {
            if p["role"] == "scales" {
                let at = e * stride + p["offset"].as_u64().unwrap() as usize;
                b[at..at + p["nbytes"].as_u64().unwrap() as usize].fill(0xff);
            }
        }
    }
    std::fs::write(&layer, &b).unwrap();
    let err = run_err(&mut run_ids(&m, &[]));
    assert!(
        err.contains("non-finite logits at sequence position 2"),
        "{err}"
    );
    let err = run_err(bin().args(["generate", "--ids", "1,2", "--model"]).arg(&m));
    assert!(err.contains("non-finite logits"), "{err}");
    let err = run_err(
        bin()
            .args(["run", "--prompt", "hi", "--tokens", "3", "--model"])
            .arg(&m),
    );
    assert!(err.contains("non-finite logits"), "{err}");
}
