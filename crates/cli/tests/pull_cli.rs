//! `flashmoe pull` against a local stand-in for the Hub (no internet): the packed result is byte
//! for byte what `pack` makes of the same files, through dropped connections, truncated
//! responses and a corrupted download; an interrupted pull never looks complete and resumes
//! where it stopped; refusals (401, 404, checksum) say what to do; shards are freed once packed
//! unless --keep-source; a shard in the Hugging Face cache is used in place.
mod common;
mod hub_server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hub_server::{Faults, Hub, COMMIT};

const REPO: &str = "test-org/tiny-a";

/// tiny-a's bf16 checkpoint split into three shards (name order, so one layer's experts straddle
/// two shards) with an index, as transformers writes a large model.
fn sharded_bf16(shared: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = shared.join("golden/tiny-a/hf-bf16");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let per = names.len().div_ceil(3);
    let mut files = Vec::new();
    let mut map = BTreeMap::new();
    for (i, group) in names.chunks(per).enumerate() {
        let fname = format!("model-{:05}-of-00003.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = group
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        files.push((fname.clone(), safetensors::serialize(views, None).unwrap()));
        for n in group {
            map.insert(n.clone(), fname.clone());
        }
    }
    // A shard of tensors flashmoe does not use (the MTP head): a pull skips it.
    let mtp = vec![0u8; 800_000];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![400_000], &mtp);
    files.push((
        UNUSED.into(),
        safetensors::serialize([("mtp.fc.weight", view.unwrap())], None).unwrap(),
    ));
    map.insert("mtp.fc.weight".into(), UNUSED.into());
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    files.push((
        "model.safetensors.index.json".into(),
        serde_json::to_vec_pretty(&index).unwrap(),
    ));
    for f in ["config.json", "generation_config.json"] {
        files.push((f.into(), std::fs::read(dir.join(f)).unwrap()));
    }
    files.push(("README.md".into(), b"# tiny-a\n".to_vec()));
    files
}

fn dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// `pack` of the files the hub serves (the reference a pull must equal).
fn packed_reference(tmp: &Path, files: &[(String, Vec<u8>)], extra: &[&str]) -> PathBuf {
    let src = tmp.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (n, b) in files {
        write(&src.join(n), b);
    }
    let dst = tmp.join("ref");
    run_ok(
        bin()
            .arg("pack")
            .args(extra)
            .arg("--from")
            .arg(&src)
            .arg("--out")
            .arg(&dst),
    );
    dst
}

/// Every file of a packed model but the manifest, whose `source` differs (a path vs the repo):
/// its tables must match.
fn assert_same_model(a: &Path, b: &Path) {
    let list = |d: &Path| {
        let mut v: Vec<String> = walk(d)
            .into_iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list(a), list(b), "same files");
    for f in list(a) {
        let (x, y) = (
            std::fs::read(a.join(&f)).unwrap(),
            std::fs::read(b.join(&f)).unwrap(),
        );
        if f == "manifest.json" {
            let mut x: serde_json::Value = serde_json::from_slice(&x).unwrap();
            let mut y: serde_json::Value = serde_json::from_slice(&y).unwrap();
            x["source"]["path"] = "-".into();
            y["source"]["path"] = "-".into();
            assert_eq!(x, y, "manifest tables");
        } else {
            assert!(x == y, "{f} differs between pull and pack");
        }
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn pull(hub: &Hub, out: &Path, home: &Path) -> Command {
    let mut c = bin();
    c.args(["pull", REPO, "--chunk-bytes", "300000", "--retries", "2"])
        .arg("--out")
        .arg(out)
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env("NO_PROXY", "127.0.0.1,localhost");
    c
}

fn cdn_requests(hub: &Hub, file: &str) -> Vec<Option<u64>> {
    hub.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == format!("/cdn/{file}"))
        .map(|r| r.range_start)
        .collect()
}

const SHARD1: &str = "model-00001-of-00003.safetensors";
const SHARD2: &str = "model-00002-of-00003.safetensors";
const SHARD3: &str = "model-00003-of-00003.safetensors";
const UNUSED: &str = "model-mtp.safetensors";

#[test]
fn pull_through_faults_equals_pack_and_frees_the_shards() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-faults");
    let files = sharded_bf16(&shared);
    let reference = packed_reference(&tmp, &files, &[]);
    let size2 = files.iter().find(|f| f.0 == SHARD2).unwrap().1.len() as u64;
    let drop_at = size2 / 3 + 12345;
    let mut faults = Faults {
        token: Some("secret".into()),
        ..Faults::default()
    };
    faults.drop_at.insert(SHARD2.into(), drop_at);
    faults.short_once.insert(SHARD1.into());
    faults.corrupt.insert(SHARD3.into(), 1);
    let hub = Hub::start(REPO, files, faults);
    let out = tmp.join("pulled");
    let o = run_ok(
        pull(&hub, &out, &tmp.join("home"))
            .args(["--include", "README*", "--jobs", "3"])
            .env("HF_TOKEN", "secret"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("checksum mismatch for {SHARD3}")),
        "{err}"
    );
    // The dropped connection resumed by Range at the byte where it broke.
    assert!(
        cdn_requests(&hub, SHARD2).contains(&Some(drop_at)),
        "{:?}",
        cdn_requests(&hub, SHARD2)
    );
    // Of the unused shard only the header was read.
    let unused: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.path == format!("/cdn/{UNUSED}"))
        .collect();
    assert!(
        !unused.is_empty() && unused.iter().all(|r| r.range_end.is_some_and(|e| e < 1000)),
        "{unused:?}"
    );
    assert_eq!(std::fs::read(out.join("README.md")).unwrap(), b"# tiny-a\n");
    std::fs::remove_file(out.join("README.md")).unwrap();
    assert_same_model(&reference, &out);
    assert!(
        !walk(&out)
            .iter()
            .any(|p| p.display().to_string().ends_with(".safetensors")),
        "source shards must be gone without --keep-source: {:?}",
        walk(&out)
    );
    assert!(!out.join(".flashmoe-pull").exists());
}

#[test]
fn pull_mlx_with_keep_source() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-mlx");
    let files = dir_files(&shared.join("golden/tiny-a/mlx-4bit"));
    let reference = packed_reference(&tmp, &files, &[]);
    let hub = Hub::start(REPO, files.clone(), Faults::default());
    let out = tmp.join("pulled");
    let o = run_ok(pull(&hub, &out, &tmp.join("home")).arg("--keep-source"));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("128 copied byte for byte"), "{text}");
    for (n, b) in &files {
        assert!(
            std::fs::read(out.join("source").join(n)).unwrap() == *b,
            "{n} kept as downloaded"
        );
    }
    std::fs::remove_dir_all(out.join("source")).unwrap();
    assert_same_model(&reference, &out);
}

#[test]
fn interrupted_pull_never_looks_complete_and_resumes() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-resume");
    let files = sharded_bf16(&shared);
    let reference = packed_reference(&tmp, &files, &["--bits", "2"]);
    let size3 = files.iter().find(|f| f.0 == SHARD3).unwrap().1.len() as u64;
    let mut faults = Faults::default();
    // Shard 3's first chunk arrives, then the server fails for the rest of it.
    faults.fail_from.insert(SHARD3.into(), 300_000);
    let hub = Hub::start(REPO, files, faults);
    let out = tmp.join("pulled");
    let home = tmp.join("home");
    let err = run_err(pull(&hub, &out, &home).args(["--bits", "2", "--jobs", "1"]));
    assert!(err.contains(SHARD3), "names the file: {err}");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    assert!(
        !out.join("manifest.json").exists(),
        "must not look complete"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(".flashmoe-pull/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["shards"][SHARD1]["released"], true, "{state}");
    // Released means its data no longer takes disk space (only the header is kept).
    let released = out.join(".flashmoe-pull/src").join(SHARD1);
    let m = std::fs::metadata(&released).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&m) * 512 < m.len() / 4,
        "{} still holds {} blocks",
        released.display(),
        std::os::unix::fs::MetadataExt::blocks(&m)
    );
    assert_eq!(state["shards"][SHARD3]["complete"], false, "{state}");
    assert!(
        state["shards"][SHARD3]["chunks"]
            .as_str()
            .unwrap()
            .starts_with('1'),
        "{state}"
    );
    let run = run_err(
        bin()
            .args(["run", "--ids", "1,2", "--tokens", "1", "--model"])
            .arg(&out),
    );
    assert!(run.contains("pull is incomplete"), "{run}");
    assert!(
        run.contains(&format!("flashmoe pull {REPO} --revision main --out")),
        "{run}"
    );

    hub.faults.lock().unwrap().fail_from.clear();
    hub.clear_log();
    run_ok(pull(&hub, &out, &home).args(["--bits", "2"]));
    // Finished shards are not fetched again; the partial one continues past its first chunk.
    assert!(cdn_requests(&hub, SHARD1).is_empty());
    assert!(cdn_requests(&hub, SHARD2).is_empty());
    let starts = cdn_requests(&hub, SHARD3);
    assert!(
        !starts.is_empty()
            && starts
                .iter()
                .all(|s| s.is_some_and(|s| s >= 300_000 && s < size3)),
        "{starts:?}"
    );
    assert_same_model(&reference, &out);
}

#[test]
fn refusals_say_what_to_do() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-refusals");
    let files = sharded_bf16(&shared);
    let home = tmp.join("home");

    let gated = Hub::start(
        REPO,
        files.clone(),
        Faults {
            token: Some("secret".into()),
            ..Faults::default()
        },
    );
    let err = run_err(&mut pull(&gated, &tmp.join("a"), &home));
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let err = run_err(pull(&gated, &tmp.join("a2"), &home).env("HF_TOKEN", "wrong"));
    assert!(err.contains("401") && err.contains("no access"), "{err}");

    let mut faults = Faults::default();
    faults.missing.insert(SHARD2.into());
    let hub = Hub::start(REPO, files.clone(), faults);
    let err = run_err(&mut pull(&hub, &tmp.join("b"), &home));
    assert!(err.contains("404") && err.contains(SHARD2), "{err}");

    let mut faults = Faults::default();
    faults.corrupt.insert(SHARD1.into(), 2);
    let hub = Hub::start(REPO, files.clone(), faults);
    let err = run_err(&mut pull(&hub, &tmp.join("c"), &home));
    assert!(
        err.contains(&format!("checksum mismatch for {SHARD1}")) && err.contains("twice"),
        "{err}"
    );
    assert!(!tmp.join("c/manifest.json").exists());

    let err = run_err(pull(&hub, &tmp.join("e"), &home).args(["--revision", "nope"]));
    assert!(
        err.contains("404") && err.contains("no such revision"),
        "{err}"
    );
    let hub = Hub::start("test-org/other", files, Faults::default());
    let err = run_err(&mut pull(&hub, &tmp.join("d"), &home));
    assert!(
        err.contains("404") && err.contains("repository test-org/tiny-a not found"),
        "{err}"
    );
}

#[test]
fn shard_in_the_hf_cache_is_used_in_place() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-cache");
    let files = sharded_bf16(&shared);
    let reference = packed_reference(&tmp, &files, &[]);
    let home = tmp.join("home");
    let snap = home
        .join("hub/models--test-org--tiny-a/snapshots")
        .join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    let shard1 = &files.iter().find(|f| f.0 == SHARD1).unwrap().1;
    write(&snap.join(SHARD1), shard1);
    // A cached copy that does not match the Hub's checksum is not used.
    let mut bad = files.iter().find(|f| f.0 == SHARD2).unwrap().1.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    write(&snap.join(SHARD2), &bad);
    let hub = Hub::start(REPO, files.clone(), Faults::default());
    let out = tmp.join("pulled");
    run_ok(&mut pull(&hub, &out, &home));
    assert!(cdn_requests(&hub, SHARD1).is_empty(), "read from the cache");
    assert!(
        !cdn_requests(&hub, SHARD2).is_empty(),
        "corrupt cache copy ignored"
    );
    assert!(
        std::fs::read(snap.join(SHARD1)).unwrap() == *shard1,
        "the cache is left as it was"
    );
    assert_same_model(&reference, &out);
}

#[test]
fn pull_fused_single_file_equals_pack() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-fused");
    let files = dir_files(&shared.join("golden/tiny-a/hf-bf16-fused"));
    let reference = packed_reference(&tmp, &files, &["--dense-bits", "16"]);
    let hub = Hub::start(REPO, files, Faults::default());
    let out = tmp.join("pulled");
    run_ok(pull(&hub, &out, &tmp.join("home")).args(["--dense-bits", "16", "--jobs", "4"]));
    assert_same_model(&reference, &out);
    assert!(!out.join(".flashmoe-pull").exists());
}

#[test]
fn killed_pull_resumes() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("pull-kill");
    let files = sharded_bf16(&shared);
    let reference = packed_reference(&tmp, &files, &[]);
    let mut faults = Faults::default();
    faults.stall.insert(SHARD3.into(), 300_000);
    let hub = Hub::start(REPO, files, faults);
    let out = tmp.join("pulled");
    let home = tmp.join("home");
    let mut child = pull(&hub, &out, &home)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once shard 1 is packed and freed while shard 3 hangs mid-download.
    let state = out.join(".flashmoe-pull/state.json");
    let released = || {
        std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["shards"][SHARD1]["released"] == true)
    };
    let t = std::time::Instant::now();
    while !released() {
        assert!(
            t.elapsed().as_secs() < 60,
            "shard 1 never released: {:?}",
            std::fs::read_to_string(&state)
        );
        assert!(child.try_wait().unwrap().is_none(), "pull ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.join("manifest.json").exists(),
        "must not look complete"
    );
    let run = run_err(
        bin()
            .args(["run", "--ids", "1,2", "--tokens", "1", "--model"])
            .arg(&out),
    );
    assert!(run.contains("pull is incomplete"), "{run}");

    hub.faults.lock().unwrap().stall.clear();
    hub.clear_log();
    run_ok(&mut pull(&hub, &out, &home));
    assert!(cdn_requests(&hub, SHARD1).is_empty());
    assert_same_model(&reference, &out);
}
