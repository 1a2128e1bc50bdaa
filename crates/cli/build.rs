//! Embeds the commit this binary was built from as `FLASHMOE_BUILD_COMMIT`, so `bench
//! --record` rows say what produced them even when the bench runs outside the repository.
//! Outside a git checkout (a crates.io or tarball build) it falls back to `v` + the package
//! version. Cargo reruns this when HEAD moves: the HEAD file itself (a checkout), the branch
//! ref it points at (a commit), and packed-refs (where `git gc` moves refs).
use std::process::Command;

/// `git ARGS` run in this crate's directory, trimmed stdout, None on any failure.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    if commit.is_some() {
        // `--git-path` resolves worktrees (HEAD per worktree, refs in the common dir).
        let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(branch);
        }
        // Paths come relative to this crate's directory, as cargo reads them.
        for p in watch {
            let Some(path) = git(&["rev-parse", "--git-path", &p]) else {
                continue;
            };
            let path = std::path::PathBuf::from(path);
            // A path that does not exist would make cargo rerun this on every build; a
            // packed branch ref gets its loose file back on the next commit, so watch the
            // folder that file will appear in.
            let watched = if path.exists() {
                Some(path)
            } else {
                path.parent()
                    .filter(|d| d.exists())
                    .map(|d| d.to_path_buf())
            };
            if let Some(w) = watched {
                println!("cargo:rerun-if-changed={}", w.display());
            }
        }
    } else {
        // No git: nothing to watch but this file (otherwise cargo would rerun on any change).
        println!("cargo:rerun-if-changed=build.rs");
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let id = commit.unwrap_or_else(|| format!("v{version}"));
    println!("cargo:rustc-env=FLASHMOE_BUILD_COMMIT={id}");
}
