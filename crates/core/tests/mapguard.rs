//! `mapguard`: a mapped model file that changes is reported by name, and a truncation under a
//! live mapping is a recorded fault (zeros), not a SIGBUS that kills the process.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use flashmoe_core::mapguard;
use memmap2::Mmap;

fn temp_file(tag: &str, len: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashmoe-mapguard-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("dense.bin");
    let mut f = File::create(&path).expect("creating");
    f.write_all(&vec![7u8; len]).expect("writing");
    path
}

fn map(path: &PathBuf) -> Arc<Mmap> {
    let f = File::open(path).expect("opening");
    // SAFETY: the test owns the file; the truncation below is the point of the test.
    let m = Arc::new(unsafe { Mmap::map(&f) }.expect("mapping"));
    mapguard::register(path, &f, &m);
    m
}

fn truncate(path: &PathBuf, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .expect("truncating");
}

// One test: the registry and the handler are process-wide, so the steps run in order.
#[test]
fn changed_and_truncated_files_are_errors_naming_them() {
    // Rewritten in place (same size): named.
    let a = temp_file("rewrite", 3 * 4096);
    let ma = map(&a);
    mapguard::check_unchanged().expect("unchanged at first");
    std::thread::sleep(std::time::Duration::from_millis(20));
    OpenOptions::new()
        .write(true)
        .open(&a)
        .and_then(|mut f| f.write_all(b"x"))
        .expect("rewriting");
    let e = mapguard::check_unchanged().expect_err("a rewrite must be seen");
    assert!(e.to_string().contains(&a.display().to_string()), "{e}");
    // Dropping the mapping forgets the file.
    drop(ma);
    mapguard::check_unchanged().expect("a dropped mapping is not checked");

    // Truncated under a live mapping: reading it faults; with recovery on, the read sees
    // zeros and the fault is reported by name.
    let b = temp_file("truncate", 3 * 4096);
    let mb = map(&b);
    mapguard::recover_faults();
    mapguard::check_faults().expect("no fault yet");
    truncate(&b, 0);
    let e = mapguard::check_unchanged().expect_err("a truncation must be seen");
    assert!(e.to_string().contains("-> 0 bytes"), "{e}");
    let sum: u64 = mb.iter().step_by(4096).map(|&x| x as u64).sum();
    assert_eq!(sum, 0, "reads after the fault see zeros");
    let e = mapguard::check_faults().expect_err("the fault must be reported");
    assert!(
        e.to_string().contains("dense.bin") && e.to_string().contains("truncated"),
        "{e}"
    );

    // One model's changed files do not fail another model's checks (an engine checks the
    // files under its own directory): a process may hold several models.
    let c = temp_file("other-model", 2 * 4096);
    let _mc = map(&c);
    let c_dir = c.parent().expect("dir");
    mapguard::check_unchanged_in(c_dir).expect("the other model is unchanged");
    mapguard::check_faults_in(c_dir).expect("the other model did not fault");
    let b_dir = b.parent().expect("dir");
    mapguard::check_unchanged_in(b_dir).expect_err("the truncated model is still reported");
    mapguard::check_faults_in(b_dir).expect_err("and its fault");
    drop(mb);
}
