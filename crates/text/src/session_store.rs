//! Chat sessions on disk: one JSONL file per session under the data directory.
//!
//! Line 1 is a [`SessionHeader`] (id, creation time, model path); every later line is one
//! message as given (OpenAI-style JSON). Owns locating the directory, appending durably and
//! reading back with errors that name the file and line. It never rewrites or truncates a file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TextError};

/// First line of a session file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionHeader {
    /// File stem; letters, digits, `-` and `_` only.
    pub id: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Model directory the session was started with.
    pub model: String,
}

/// A loaded session: header plus messages in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub header: SessionHeader,
    pub messages: Vec<Value>,
}

/// Directory of session files.
#[derive(Debug, Clone)]
pub struct SessionStore {
    dir: PathBuf,
}

impl SessionStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SessionStore { dir: dir.into() }
    }

    /// A store in [`default_dir`](Self::default_dir).
    pub fn open_default() -> Result<Self> {
        Ok(Self::new(Self::default_dir()?))
    }

    /// `$FLASHMOE_DATA_DIR/sessions`, else `$XDG_DATA_HOME/flashmoe/sessions`, else
    /// `$HOME/.local/share/flashmoe/sessions`. Empty variables count as unset (XDG rule).
    pub fn default_dir() -> Result<PathBuf> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(d) = var("FLASHMOE_DATA_DIR") {
            return Ok(d.join("sessions"));
        }
        if let Some(d) = var("XDG_DATA_HOME") {
            return Ok(d.join("flashmoe").join("sessions"));
        }
        var("HOME")
            .map(|h| h.join(".local/share/flashmoe/sessions"))
            .ok_or(TextError::NoDataDir)
    }

    /// The directory this store uses.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a session's file; rejects ids that could escape the directory.
    pub fn path_of(&self, id: &str) -> Result<PathBuf> {
        let valid = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(TextError::Session {
                id: id.to_string(),
                msg: "ids may contain only ASCII letters, digits, '-' and '_'".into(),
            });
        }
        Ok(self.dir.join(format!("{id}.jsonl")))
    }

    /// Starts a new session file with its header; the id is `<unix seconds>-<random hex>`.
    pub fn create(&self, model: &Path) -> Result<SessionHeader> {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = SessionHeader {
            id: format!("{created}-{:08x}", rand::random::<u32>()),
            created,
            model: model.display().to_string(),
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| TextError::io("creating directory", &self.dir, e))?;
        let path = self.path_of(&header.id)?;
        let line = serde_json::to_string(&header).map_err(|source| TextError::Json {
            path: path.clone(),
            source,
        })?;
        // create_new: never clobber an existing session even if ids collide.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TextError::io("creating", &path, e))?;
        write_line(&mut file, &path, &line)?;
        Ok(header)
    }

    /// Appends one message to an existing session, flushed and synced before returning.
    pub fn append(&self, id: &str, message: &Value) -> Result<()> {
        let path = self.path_of(id)?;
        let line = serde_json::to_string(message).map_err(|source| TextError::Json {
            path: path.clone(),
            source,
        })?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TextError::Session {
                    id: id.to_string(),
                    msg: format!("no session file {}", path.display()),
                },
                _ => TextError::io("opening", &path, e),
            })?;
        write_line(&mut file, &path, &line)
    }

    /// Reads a session back.
    pub fn load(&self, id: &str) -> Result<Session> {
        let path = self.path_of(id)?;
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TextError::Session {
                id: id.to_string(),
                msg: format!("no session file {}", path.display()),
            },
            _ => TextError::io("reading", &path, e),
        })?;
        parse_session(&text, &path)
    }

    /// Headers of all sessions, oldest first. Files with unreadable headers are errors, so a
    /// corrupt file is noticed rather than silently hidden.
    pub fn list(&self) -> Result<Vec<SessionHeader>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(TextError::io("listing", &self.dir, e)),
        };
        let mut headers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| TextError::io("listing", &self.dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| TextError::io("reading", &path, e))?;
            let first = text.lines().next().unwrap_or("");
            headers.push(parse_header(first, &path)?);
        }
        headers.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(headers)
    }
}

/// One `write_all` per line so a concurrent reader never sees half a record from us, then
/// flush + fsync so an acknowledged message survives a crash.
fn write_line(file: &mut std::fs::File, path: &Path, line: &str) -> Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    file.write_all(&buf)
        .and_then(|_| file.flush())
        .and_then(|_| file.sync_data())
        .map_err(|e| TextError::io("writing", path, e))
}

fn parse_header(line: &str, path: &Path) -> Result<SessionHeader> {
    serde_json::from_str(line).map_err(|e| TextError::SessionCorrupt {
        path: path.to_path_buf(),
        line: 1,
        msg: format!("bad header: {e}"),
    })
}

fn parse_session(text: &str, path: &Path) -> Result<Session> {
    let mut lines = text.lines();
    let header = parse_header(lines.next().unwrap_or(""), path)?;
    let mut messages = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let msg = serde_json::from_str(line).map_err(|e| TextError::SessionCorrupt {
            path: path.to_path_buf(),
            line: i + 2,
            msg: e.to_string(),
        })?;
        messages.push(msg);
    }
    Ok(Session { header, messages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_store(tag: &str) -> SessionStore {
        let dir =
            std::env::temp_dir().join(format!("flashmoe-sessions-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        SessionStore::new(dir)
    }

    #[test]
    fn round_trip() {
        let store = temp_store("rt");
        assert!(store.list().unwrap().is_empty());
        let h = store.create(Path::new("/models/qwen")).unwrap();
        let msgs = [
            json!({"role": "user", "content": "hi\nthere ✓"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}),
        ];
        for m in &msgs {
            store.append(&h.id, m).unwrap();
        }
        let s = store.load(&h.id).unwrap();
        assert_eq!(s.header, h);
        assert_eq!(s.header.model, "/models/qwen");
        assert_eq!(s.messages, msgs);
        let h2 = store.create(Path::new("m2")).unwrap();
        let ids: Vec<_> = store.list().unwrap().into_iter().map(|h| h.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&h.id) && ids.contains(&h2.id));
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn corrupt_line_names_file_and_line() {
        let store = temp_store("bad");
        let h = store.create(Path::new("m")).unwrap();
        store
            .append(&h.id, &json!({"role": "user", "content": "x"}))
            .unwrap();
        let path = store.path_of(&h.id).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{not json\n").unwrap();
        let err = store.load(&h.id).unwrap_err();
        assert!(
            matches!(err, TextError::SessionCorrupt { line: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn bad_and_missing_ids_are_errors() {
        let store = temp_store("ids");
        assert!(store.path_of("../etc/passwd").is_err());
        assert!(store.load("nope").is_err());
        assert!(store.append("nope", &json!({})).is_err());
    }
}
