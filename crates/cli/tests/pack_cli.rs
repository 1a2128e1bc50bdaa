//! CLI contract of `pack` and `synth`: a packed model runs through `logits` unchanged (cached
//! and O_DIRECT give the same bytes), refuses overwrites, and a failed or killed pack never
//! leaves a directory that looks complete.
mod common;

use common::*;

const IDS: &str = "1,2,3,4,5,6,7,8";

#[test]
fn pack_then_logits_cached_and_direct() {
    let Some(shared) = shared_dir() else { return };
    let src = shared.join("golden/tiny-a/mlx-4bit");
    let tmp = temp_dir("pack-cli");
    let dst = tmp.join("m");
    let out = run_ok(
        bin()
            .args(["pack", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&dst),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("128 copied byte for byte"), "{text}");
    let err = run_err(
        bin()
            .args(["pack", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&dst),
    );
    assert!(err.contains("--force"), "{err}");
    run_ok(
        bin()
            .args(["pack", "--force", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&dst),
    );

    let logits = |model: &std::path::Path, io: &str, name: &str| {
        let f = tmp.join(name);
        run_ok(
            bin()
                .args(["logits", "--ids", IDS, "--io", io, "--model"])
                .arg(model)
                .arg("--out")
                .arg(&f),
        );
        std::fs::read(f).unwrap()
    };
    let a = logits(&src, "cached", "src.safetensors");
    let b = logits(&dst, "cached", "cached.safetensors");
    assert_eq!(
        a, b,
        "packed MLX model must compute exactly what the checkpoint does"
    );
    let f = tmp.join("direct.safetensors");
    let o = bin()
        .args([
            "logits", "--ids", IDS, "--io", "direct", "--verify", "--model",
        ])
        .arg(&dst)
        .arg("--out")
        .arg(&f)
        .output()
        .unwrap();
    if o.status.success() {
        assert_eq!(
            std::fs::read(f).unwrap(),
            b,
            "--io direct differs from cached"
        );
    } else {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("O_DIRECT is not supported"), "{e}");
        flashmoe_testdata::say_skipped(&format!(
            "O_DIRECT unsupported here, direct comparison not run: {e}"
        ));
    }
}

/// tiny-a's bf16 checkpoint, a fresh temp dir, an output `m` in it and that output's
/// `m.partial`; None (skipped) without the shared data.
fn tiny_pack_paths(name: &str) -> Option<[std::path::PathBuf; 4]> {
    let src = shared_dir()?.join("golden/tiny-a/hf-bf16");
    let tmp = temp_dir(name);
    let (dst, partial) = (tmp.join("m"), tmp.join("m.partial"));
    Some([src, tmp, dst, partial])
}

#[test]
fn failed_or_killed_pack_leaves_nothing_complete() {
    let Some([src, tmp, dst, partial]) = tiny_pack_paths("pack-cli-fail") else {
        return;
    };
    let script = |trap: &str| {
        format!(
            // Dense kept bf16 so dense.bin (2.8 MB) is the file that crosses the limit.
            "{trap} ulimit -f 1000; exec '{}' pack --dense-bits 16 --from '{}' --out '{}'",
            env!("CARGO_BIN_EXE_flashmoe"),
            src.display(),
            dst.display()
        )
    };
    // A write error (file size limit standing in for a full disk): named, and cleaned up.
    let o = std::process::Command::new("bash")
        .args(["-c", &script("trap '' XFSZ;")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("dense.bin") && err.contains("write failed"),
        "{err}"
    );
    assert!(
        !dst.exists() && !partial.exists(),
        "failed pack left files behind"
    );
    // Killed mid-write (SIGXFSZ): only DST.partial remains, which never loads as a model.
    let o = std::process::Command::new("bash")
        .args(["-c", &script("")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        !dst.exists(),
        "a killed pack must not leave {}",
        dst.display()
    );
    let err = run_err(
        bin()
            .args(["logits", "--ids", IDS, "--model"])
            .arg(&partial)
            .arg("--out")
            .arg(tmp.join("x.safetensors")),
    );
    assert!(err.contains("incomplete"), "{err}");
    // The next pack clears the stale partial and completes.
    run_ok(
        bin()
            .args(["pack", "--bits", "2", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&dst),
    );
    assert!(dst.join("manifest.json").exists() && !partial.exists());
}

#[test]
fn synth_tiny_runs() {
    let tmp = temp_dir("synth-cli");
    let dst = tmp.join("tiny");
    run_ok(
        bin()
            .args([
                "synth", "--preset", "tiny", "--layers", "2", "--seed", "3", "--out",
            ])
            .arg(&dst),
    );
    run_ok(
        bin()
            .args(["logits", "--ids", IDS, "--model"])
            .arg(&dst)
            .arg("--out")
            .arg(tmp.join("l.safetensors")),
    );
    let err = run_err(bin().args(["synth", "--preset", "nope", "--out"]).arg(&dst));
    assert!(err.contains("tiny"), "{err}");
}

#[test]
fn synth_takes_a_gzipped_tokenizer() {
    // The shared Qwen3.5 tokenizer is stored as tokenizer.json.gz only: synth must size its
    // vocabulary from it and copy it, so the model takes text.
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("synth-cli-gz-tokenizer");
    let dst = tmp.join("tiny");
    run_ok(
        bin()
            .args(["synth", "--preset", "tiny", "--layers", "1", "--tokenizer"])
            .arg(shared.join("tokenizer/qwen3.5"))
            .arg("--out")
            .arg(&dst),
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("config.json")).unwrap()).unwrap();
    let vocab = cfg["text_config"]["vocab_size"].as_u64().unwrap();
    assert!(
        vocab >= 248_077,
        "vocab {vocab} smaller than the tokenizer's"
    );
    let out = run_ok(
        bin()
            .args(["run", "--prompt", "Hello", "--tokens", "2", "--model"])
            .arg(&dst),
    );
    assert!(out.status.success());
}

#[test]
fn pack_never_replaces_its_own_source() {
    // `--force` replaces the output once the new model is complete; pointed at the source (or
    // a directory holding it) it used to delete the checkpoint it had just read.
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pack-cli-own-source");
    let src = tmp.join("ckpt");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(shared.join("golden/tiny-a/hf-bf16").join(f), src.join(f)).unwrap();
    }
    for out in [src.clone(), tmp.clone(), src.join(".")] {
        let err = run_err(
            bin()
                .args(["pack", "--force", "--from"])
                .arg(&src)
                .arg("--out")
                .arg(&out),
        );
        assert!(err.contains("source checkpoint"), "{err}");
        assert!(
            src.join("model.safetensors").is_file() && src.join("config.json").is_file(),
            "pack --out {} destroyed its source",
            out.display()
        );
    }
    // A fresh directory beside the source is fine.
    run_ok(
        bin()
            .args(["pack", "--force", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(tmp.join("packed")),
    );
}

#[test]
fn ctrl_c_during_pack_removes_the_partial_and_keeps_the_old_output() {
    // SIGINT used to end pack with OUT.partial left on disk (as large as what had been
    // written); now the handler removes it, and the previous output stays as it was.
    let Some([src, _, dst, partial]) = tiny_pack_paths("pack-cli-ctrl-c") else {
        return;
    };
    run_ok(
        bin()
            .args(["pack", "--from"])
            .arg(&src)
            .arg("--out")
            .arg(&dst),
    );
    let old = std::fs::read(dst.join("manifest.json")).unwrap();
    let mut child = bin()
        .args(["pack", "--force", "--bits", "2", "--from"])
        .arg(&src)
        .arg("--out")
        .arg(&dst)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt as soon as the conversion has started writing.
    let t0 = std::time::Instant::now();
    while !partial.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "pack ended before it could be interrupted"
        );
        assert!(t0.elapsed().as_secs() < 60, "pack never started writing");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let pid = child.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!partial.exists(), "{} left behind", partial.display());
    assert_eq!(std::fs::read(dst.join("manifest.json")).unwrap(), old);
}
