//! Fault injection on model files, at the engine's level: every damaged or absurd input a user
//! can hand the loader (manifest numbers, config numbers, truncated, missing, corrupt or
//! misplaced files, flipped bytes, NaN weights) gives a named error, never a panic, an abort or
//! silent garbage. The models are `synth --preset tiny` ones (no shared data needed); the CLI's
//! side (pack, signals, full disk, exit codes) is in crates/cli/tests/faults_model.rs.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flashmoe_core::config::ModelConfig;
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::model::Model;
use flashmoe_core::packed::{
    synth, synth_config, verify_note, DenseVerified, Manifest, NoProgress, Role, SynthOptions,
};
use flashmoe_core::session::{SeqBackend, Session};
use flashmoe_core::Error;
use serde_json::{json, Value};

fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny random packed model (2 GatedDeltaNet + MoE layers, 16 experts of 4 bits).
fn tiny(name: &str) -> PathBuf {
    let dir = tmp(name);
    let o = SynthOptions {
        preset: "tiny".into(),
        layers: Some(2),
        experts: None,
        bits: 4,
        dense_bits: 4,
        seed: 5,
        force: false,
        vocab: None,
        tokenizer: None,
    };
    synth(&dir, &o, &NoProgress).expect("synth tiny");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn load(dir: &Path, verify: bool) -> Result<Model, Error> {
    let o = LoadOptions {
        verify,
        ..Default::default()
    };
    open_model(dir, &o)
}

/// The load error of `dir`, which must contain every one of `words`.
fn refused(dir: &Path, verify: bool, words: &[&str], case: &str) -> String {
    let e = match load(dir, verify) {
        Ok(_) => panic!("{case}: loaded a damaged model"),
        Err(e) => e.to_string(),
    };
    for w in words {
        assert!(e.contains(w), "{case}: error {e:?} does not say {w:?}");
    }
    e
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn tensor_index(m: &Value, name: &str) -> usize {
    m["dense"]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .position(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

#[test]
fn manifest_numbers_are_checked_against_each_other_and_the_files() {
    // `experts.group_size: 0` divided by zero when the layout was rebuilt; the others let a
    // bad offset, stride or count reach a slice, an allocation or an O_DIRECT read.
    let good = tiny("manifest-good");
    load(&good, true).expect("the untouched model loads");
    let emb = tensor_index(
        &read_json(&good.join("manifest.json")),
        "embed_tokens.weight",
    );
    let big = 1u64 << 62;
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "group 0",
            Box::new(|m| m["experts"]["group_size"] = json!(0)),
            &["group_size 0"],
        ),
        (
            "group 48",
            Box::new(|m| m["experts"]["group_size"] = json!(48)),
            &["group_size 48"],
        ),
        (
            "bits 3",
            Box::new(|m| m["experts"]["bits"] = json!(3)),
            &["bits 3"],
        ),
        (
            "bits 0",
            Box::new(|m| m["experts"]["bits"] = json!(0)),
            &["bits 0"],
        ),
        (
            "stride 0",
            Box::new(|m| m["experts"]["stride"] = json!(0)),
            &["stride 0"],
        ),
        (
            "stride odd",
            Box::new(|m| m["experts"]["stride"] = json!(16385)),
            &["stride 16385"],
        ),
        (
            "stride huge",
            Box::new(move |m| m["experts"]["stride"] = json!(big)),
            &["overflows"],
        ),
        (
            "count 0",
            Box::new(|m| m["experts"]["count"] = json!(0)),
            &["count 0"],
        ),
        (
            "count huge",
            Box::new(move |m| m["experts"]["count"] = json!(big)),
            &["count"],
        ),
        (
            "expert_bytes",
            Box::new(|m| m["experts"]["expert_bytes"] = json!(9)),
            &["parts"],
        ),
        (
            "part offset",
            Box::new(|m| m["experts"]["parts"][1]["offset"] = json!(4097)),
            &["parts"],
        ),
        (
            "part shape",
            Box::new(|m| m["experts"]["parts"][0]["shape"] = json!([0, 16])),
            &["parts"],
        ),
        (
            "scale dtype",
            Box::new(|m| {
                for i in 0..9 {
                    if m["experts"]["parts"][i]["role"] != "weight" {
                        m["experts"]["parts"][i]["dtype"] = json!("I64");
                    }
                }
            }),
            &["dtype"],
        ),
        (
            "layer twice",
            Box::new(|m| m["experts"]["layers"][1]["layer"] = json!(0)),
            &["listed twice"],
        ),
        (
            "layer beyond",
            Box::new(|m| m["experts"]["layers"][1]["layer"] = json!(7)),
            &["layer 7"],
        ),
        (
            "layer file",
            Box::new(|m| m["experts"]["layers"][0]["file"] = json!("../x.bin")),
            &["../x.bin"],
        ),
        (
            "crc count",
            Box::new(|m| m["experts"]["layers"][0]["crc32"] = json!([1, 2])),
            &["2 checksums"],
        ),
        (
            "dense file",
            Box::new(|m| m["dense"]["file"] = json!("/etc/passwd")),
            &["/etc/passwd"],
        ),
        (
            "dense nbytes",
            Box::new(move |m| m["dense"]["nbytes"] = json!(big)),
            &["dense.bin", "truncated"],
        ),
        (
            "tensor offset",
            Box::new(move |m| m["dense"]["tensors"][emb]["offset"] = json!(u64::MAX - 8)),
            &["embed_tokens.weight", "overflows"],
        ),
        (
            "tensor misaligned",
            Box::new(move |m| m["dense"]["tensors"][emb]["offset"] = json!(2)),
            &["embed_tokens.weight", "multiple of 64"],
        ),
        (
            "tensor shape overflow",
            Box::new(move |m| {
                m["dense"]["tensors"][emb]["shape"] = json!([1u64 << 40, 1u64 << 40])
            }),
            &["embed_tokens.weight", "overflows"],
        ),
        (
            "tensor nbytes",
            Box::new(move |m| m["dense"]["tensors"][emb]["nbytes"] = json!(7)),
            &["embed_tokens.weight"],
        ),
        (
            "tensor group 0",
            Box::new(move |m| m["dense"]["tensors"][emb]["quant"]["group_size"] = json!(0)),
            &["embed_tokens.weight", "group_size 0"],
        ),
        (
            "tensor bits 3",
            Box::new(move |m| m["dense"]["tensors"][emb]["quant"]["bits"] = json!(3)),
            &["embed_tokens.weight", "3 bits"],
        ),
        (
            "tensor without crc",
            Box::new(move |m| {
                m["dense"]["tensors"][emb]
                    .as_object_mut()
                    .unwrap()
                    .remove("crc32");
            }),
            &["embed_tokens.weight", "no crc32"],
        ),
        (
            "version 99",
            Box::new(|m| m["format_version"] = json!(99)),
            &["format_version 99"],
        ),
        (
            "format",
            Box::new(|m| m["format"] = json!("gguf")),
            &["gguf"],
        ),
        (
            "config experts",
            Box::new(|m| m["config"]["text_config"]["num_experts"] = json!(1099511627776u64)),
            &["num_experts", "1099511627776"],
        ),
        (
            "config vocab",
            Box::new(|m| m["config"]["text_config"]["vocab_size"] = json!(321)),
            &["embed_tokens", "321"],
        ),
        (
            "config conv",
            Box::new(|m| {
                m["config"]["text_config"]["linear_conv_kernel_dim"] = json!(1_000_000_000)
            }),
            &["linear_conv_kernel_dim"],
        ),
        (
            "config context",
            Box::new(|m| m["config"]["text_config"]["max_position_embeddings"] = json!(0)),
            &["max_position_embeddings"],
        ),
        (
            "not json",
            Box::new(|m| *m = json!("[")),
            &["manifest.json"],
        ),
    ];
    let dir = tmp("manifest-case");
    for (case, edit, words) in cases {
        copy_dir(&good, &dir);
        let p = dir.join("manifest.json");
        let mut m = read_json(&p);
        edit(&mut m);
        if m == json!("[") {
            std::fs::write(&p, "{\"format\": ").unwrap();
        } else {
            write_json(&p, &m);
        }
        let e = refused(&dir, false, words, case);
        assert!(
            e.contains(dir.to_str().unwrap()),
            "{case}: names no file: {e}"
        );
    }
}

#[test]
fn config_numbers_beyond_sane_bounds_are_refused_before_allocating() {
    // num_experts 2^40 aborted on a failed allocation; num_hidden_layers 2^40 without
    // layer_types built a table of that many entries; max_position_embeddings 0 loaded and
    // refused every token.
    let base = synth_config("tiny", Some(2), None, None, &[258]).unwrap();
    ModelConfig::from_json(&base, Path::new("c.json")).expect("base parses");
    let huge = 1u64 << 40;
    let cases: &[(&str, Value, &str)] = &[
        ("num_experts", json!(huge), "num_experts"),
        ("num_hidden_layers", json!(huge), "num_hidden_layers"),
        ("num_hidden_layers", json!(0), "num_hidden_layers"),
        ("vocab_size", json!(huge), "vocab_size"),
        ("hidden_size", json!(huge), "hidden_size"),
        ("head_dim", json!(huge), "head_dim"),
        (
            "linear_conv_kernel_dim",
            json!(1_000_000_000),
            "linear_conv_kernel_dim",
        ),
        (
            "linear_conv_kernel_dim",
            json!(1e9),
            "linear_conv_kernel_dim",
        ),
        (
            "linear_num_value_heads",
            json!(huge),
            "linear_num_value_heads",
        ),
        ("linear_key_head_dim", json!(huge), "linear_key_head_dim"),
        (
            "moe_intermediate_size",
            json!(huge),
            "moe_intermediate_size",
        ),
        ("moe_intermediate_size", json!(0), "moe_intermediate_size"),
        (
            "shared_expert_intermediate_size",
            json!(huge),
            "shared_expert_intermediate_size",
        ),
        (
            "max_position_embeddings",
            json!(0),
            "max_position_embeddings",
        ),
        (
            "max_position_embeddings",
            json!(huge),
            "max_position_embeddings",
        ),
        ("num_key_value_heads", json!(8), "num_key_value_heads"),
        (
            "full_attention_interval",
            json!(huge),
            "full_attention_interval",
        ),
        ("rms_norm_eps", json!(-1.0), "rms_norm_eps"),
        ("rms_norm_eps", json!(1e300), "rms_norm_eps"),
        ("eos_token_id", json!(4294967297u64), "eos_token_id"),
        ("eos_token_id", json!([1, 320]), "eos_token_id"),
        ("mlp_only_layers", json!([5]), "mlp_only_layers"),
        (
            "rope_parameters",
            json!({"rope_theta": -1.0, "rope_type": "default"}),
            "rope_theta",
        ),
        (
            "rope_parameters",
            json!({"rope_theta": 1e6, "partial_rotary_factor": 4.0, "rope_type": "default"}),
            "partial_rotary_factor",
        ),
        (
            "rope_parameters",
            json!({"rope_theta": 1e6, "rope_type": "default", "mrope_section": [u64::MAX, 2]}),
            "mrope_section",
        ),
    ];
    for (field, value, word) in cases {
        let mut v = base.clone();
        v["text_config"][*field] = value.clone();
        match ModelConfig::from_json(&v, Path::new("dir/config.json")) {
            Ok(_) => panic!("{field} = {value} accepted"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains(word) && e.contains("dir/config.json"),
                    "{field} = {value}: {e}"
                );
            }
        }
    }
}

#[test]
fn damaged_expert_and_dense_files_are_named() {
    let good = tiny("files-good");
    let dir = tmp("files-case");
    let layer = dir.join("experts/layer_001.bin");
    let dense = dir.join("dense.bin");

    // Truncated expert file (already reported before this suite).
    copy_dir(&good, &dir);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&layer)
        .unwrap();
    f.set_len(4096).unwrap();
    refused(
        &dir,
        false,
        &["layer_001.bin", "truncated"],
        "truncated layer",
    );

    // A directory in place of an expert file (or of dense.bin) was called "truncated".
    for (what, path) in [("layer", &layer), ("dense", &dense)] {
        copy_dir(&good, &dir);
        std::fs::remove_file(path).unwrap();
        std::fs::create_dir(path).unwrap();
        let e = refused(&dir, false, &["is a directory"], what);
        assert!(!e.contains("truncated"), "{what}: {e}");
    }

    // Missing files.
    for path in [&layer, &dense] {
        copy_dir(&good, &dir);
        std::fs::remove_file(path).unwrap();
        refused(&dir, false, &[path.to_str().unwrap()], "missing");
    }

    // Truncated dense.bin.
    copy_dir(&good, &dir);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dense)
        .unwrap();
    f.set_len(1000).unwrap();
    refused(&dir, false, &["dense.bin", "truncated"], "short dense");

    // No manifest: an incomplete model, not a checkpoint.
    copy_dir(&good, &dir);
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    refused(&dir, false, &["manifest.json", "incomplete"], "no manifest");

    // A corrupt expert: caught by --verify, named by layer and expert.
    copy_dir(&good, &dir);
    let mut b = std::fs::read(&layer).unwrap();
    b[3 * 16384 + 10] ^= 0x40;
    std::fs::write(&layer, &b).unwrap();
    let m = load(&dir, true).expect("experts are checked as they are read");
    match m.experts.fetch(1, &[2, 3]) {
        Err(Error::Expert { layer, expert, msg }) => {
            assert_eq!((layer, expert), (1, 3));
            assert!(msg.contains("checksum"), "{msg}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("corrupt expert not caught"),
    }
}

#[test]
fn flipped_dense_bytes_are_caught_by_verify_and_old_models_say_what_is_not_checked() {
    let good = tiny("dense-good");
    let dir = tmp("dense-case");
    copy_dir(&good, &dir);
    let man = Manifest::read(&dir).unwrap();
    let t = man
        .dense
        .tensors
        .iter()
        .find(|t| t.name == "layers.1.linear_attn.out_proj.scales")
        .unwrap();
    let mut b = std::fs::read(dir.join("dense.bin")).unwrap();
    b[t.offset as usize + 3] ^= 0x01;
    std::fs::write(dir.join("dense.bin"), &b).unwrap();
    // Without --verify the flip goes unnoticed (it changes the output); with it, it is named.
    load(&dir, false).expect("loads unverified");
    refused(
        &dir,
        true,
        &[
            "dense.bin",
            "checksum mismatch",
            "layers.1.linear_attn.out_proj.scales",
        ],
        "flipped dense byte",
    );
    assert_eq!(verify_note(&good), None, "a current model is fully checked");

    // A format-1 model (no dense checksums) still loads, verified or not, and the note says
    // what --verify cannot check there.
    let old = tmp("dense-v1");
    copy_dir(&good, &old);
    let p = old.join("manifest.json");
    let mut m = read_json(&p);
    m["format_version"] = json!(1);
    for t in m["dense"]["tensors"].as_array_mut().unwrap() {
        t.as_object_mut().unwrap().remove("crc32");
    }
    write_json(&p, &m);
    load(&old, true).expect("a version-1 model loads with --verify");
    let man = Manifest::read(&old).unwrap();
    let store = man.open_dense(&old).unwrap();
    assert_eq!(
        man.verify_dense(&old, &store).unwrap(),
        DenseVerified::NoChecksums
    );
    let note = verify_note(&old).expect("a note for a version-1 model");
    assert!(
        note.contains("format version 1") && note.contains("experts only"),
        "{note}"
    );
}

/// Sets every expert scale of `layer` in `dir` to NaN (bf16 0xffff), as a bad conversion would.
fn nan_expert_scales(dir: &Path, layer: usize) {
    let man = Manifest::read(dir).unwrap();
    let x = &man.experts;
    let p = dir.join(&x.layers.iter().find(|l| l.layer == layer).unwrap().file);
    let mut b = std::fs::read(&p).unwrap();
    for e in 0..x.count {
        for part in x.parts.iter().filter(|p| p.role == Role::Scales) {
            let at = e * x.stride as usize + part.offset as usize;
            b[at..at + part.nbytes as usize].fill(0xff);
        }
    }
    std::fs::write(&p, &b).unwrap();
}

#[test]
fn nan_weights_stop_generation_with_an_error_naming_the_position() {
    // NaN expert scales gave tokens 0,0,0 and exit 0: the logits are now checked each step.
    let dir = tiny("nan");
    nan_expert_scales(&dir, 1);
    let model = Arc::new(load(&dir, false).expect("loads: the file is intact"));
    let mut s = Session::new(model);
    match s.feed(&[1, 2, 3]) {
        Err(Error::NonFiniteLogits {
            pos, nan, vocab, ..
        }) => {
            assert_eq!(pos, 2, "the prompt's last position");
            assert!(nan > 0 && vocab == 320);
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(l) => panic!("non-finite logits returned: {:?}", &l[..4]),
    }
    let e = s
        .feed(&[1])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("non-finite logits at sequence position"), "{e}");
    // Greedy decoding's argmax reduced where the logits live (no row to check on the host):
    // the same stop, with the position, never an id.
    let model = Arc::new(load(&dir, false).expect("loads"));
    let mut seq = flashmoe_core::session::CpuBackend::new(model);
    match seq.forward_argmax(&[1, 2, 3]) {
        Err(Error::NonFiniteArgmax { pos }) => assert_eq!(pos, 2, "the prompt's last position"),
        other => panic!("wanted NonFiniteArgmax, got {other:?}"),
    }
}

#[test]
fn bad_checkpoint_headers_and_configs_are_named() {
    // A checkpoint directory: config.json plus one safetensors file.
    let dir = tmp("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = synth_config("tiny", Some(2), None, None, &[258]).unwrap();
    write_json(&dir.join("config.json"), &cfg);
    let st = dir.join("model.safetensors");
    for (case, bytes, word) in [
        (
            "header length past the end",
            b"\xff\xff\x00\x00\x00\x00\x00\x00{}".to_vec(),
            "safetensors",
        ),
        (
            "not JSON",
            b"\x04\x00\x00\x00\x00\x00\x00\x00abcd".to_vec(),
            "safetensors",
        ),
        ("empty", Vec::new(), "safetensors"),
    ] {
        std::fs::write(&st, bytes).unwrap();
        refused(&dir, false, &[word, "model.safetensors"], case);
    }
    // A config that cannot be read as JSON, and one with an absurd number.
    std::fs::write(dir.join("config.json"), "{\"model_type\": ").unwrap();
    refused(
        &dir,
        false,
        &["config.json", "invalid JSON"],
        "config not json",
    );
    let mut c = cfg.clone();
    c["text_config"]["num_experts"] = json!(1099511627776u64);
    write_json(&dir.join("config.json"), &c);
    refused(
        &dir,
        false,
        &["config.json", "num_experts"],
        "config experts",
    );
}

#[test]
fn the_logits_check_finds_nan_and_both_infinities_in_any_row() {
    use flashmoe_core::session::check_logits;
    let ok = [1.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 0.0, -0.0];
    check_logits(&ok, 3, 0).expect("finite values pass");
    for (bad, nan, inf) in [
        (f32::NAN, 1, 0),
        (f32::INFINITY, 0, 1),
        (f32::NEG_INFINITY, 0, 1),
    ] {
        let mut l = ok;
        l[4] = bad;
        match check_logits(&l, 3, 10) {
            Err(Error::NonFiniteLogits {
                pos,
                nan: n,
                inf: i,
                vocab,
            }) => assert_eq!((pos, n, i, vocab), (11, nan, inf, 3), "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}
