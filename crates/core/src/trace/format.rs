//! The routing-trace file (`--trace-routing FILE`): a small versioned header, then one record
//! per (forward call, MoE layer), each framed by a magic, its length and a CRC32, so that
//! - a crash leaves at worst a short last record: the reader reports where the tail was cut
//!   and hands back every record before it, and the writer cuts that tail off before it
//!   appends (a new run adds to an old file of the same model);
//! - a damaged byte is found (bad magic or checksum) and named by file and offset.
//!
//! Layout (little-endian):
//! - header: `FMTRACE\0`, version u16, body length u32, body, CRC32(body) u32. Body: flags u16
//!   (bit 0: hidden states recorded), layers u16, experts u32, K u16, hidden u32, expert bytes
//!   u64, MoE layer count u16 and their indices u16 each, model id length u16 and UTF-8 bytes.
//! - record: `RT`, body length u32, body, CRC32(body) u32. Body: request u64, position of the
//!   first token u32, tokens t u32, layer u16, phase u8 (0 prefill, 1 decode), flags u8 (bit 0
//!   shared-expert gate, bit 1 hidden state), ids u16 [t*K] (each token's experts by
//!   descending weight), weights f16 [t*K], gate logits f32 [t], hidden f16 [t*hidden].
//!
//! About 4 bytes per routed expert: a 40-layer K=8 model writes ~1.3 KB per token.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"FMTRACE\0";
pub const VERSION: u16 = 1;
const REC_MAGIC: &[u8; 2] = b"RT";
/// Header flag: records carry the MoE layers' input hidden states.
pub const FLAG_HIDDEN: u16 = 1;

/// What the trace was recorded on: a replay or simulation must match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    pub layers: u16,
    pub experts: u32,
    pub k: u16,
    pub hidden: u32,
    /// Bytes of one routed expert as stored (what a miss reads).
    pub expert_bytes: u64,
    /// The MoE layers' indices, ascending.
    pub moe_layers: Vec<u16>,
    /// The model's directory name and family, for messages.
    pub model_id: String,
}

impl Header {
    pub fn has_hidden(&self) -> bool {
        self.flags & FLAG_HIDDEN != 0
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.layers.to_le_bytes());
        b.extend_from_slice(&self.experts.to_le_bytes());
        b.extend_from_slice(&self.k.to_le_bytes());
        b.extend_from_slice(&self.hidden.to_le_bytes());
        b.extend_from_slice(&self.expert_bytes.to_le_bytes());
        b.extend_from_slice(&(self.moe_layers.len() as u16).to_le_bytes());
        for l in &self.moe_layers {
            b.extend_from_slice(&l.to_le_bytes());
        }
        let id = self.model_id.as_bytes();
        let id = &id[..id.len().min(u16::MAX as usize)];
        b.extend_from_slice(&(id.len() as u16).to_le_bytes());
        b.extend_from_slice(id);
        let mut out = Vec::with_capacity(b.len() + 18);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&b);
        out.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        out
    }

    /// The position of a MoE layer among the MoE layers.
    pub fn moe_index(&self, layer: u16) -> Option<usize> {
        self.moe_layers.binary_search(&layer).ok()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

/// One MoE layer of one forward call: `t` tokens from position `pos`.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub request: u64,
    pub pos: u32,
    pub t: u32,
    pub layer: u16,
    pub phase: Phase,
    /// `[t, K]`, each token's experts by descending weight.
    pub ids: Vec<u16>,
    pub weights: Vec<f32>,
    /// `[t]` shared-expert gate logits (models with a shared expert).
    pub gate: Option<Vec<f32>>,
    /// `[t, hidden]` the layer's router input (when recorded).
    pub hidden: Option<Vec<f32>>,
}

impl Record {
    /// Token `i`'s experts.
    pub fn token(&self, i: usize, k: usize) -> &[u16] {
        &self.ids[i * k..(i + 1) * k]
    }
    /// The distinct experts of all tokens, ascending: the order the engine fetches them in.
    pub fn used(&self) -> Vec<u16> {
        let mut u = self.ids.clone();
        u.sort_unstable();
        u.dedup();
        u
    }
}

/// What one record is made of, borrowed from where it was produced (the recording tap).
pub struct RecordParts<'a> {
    pub request: u64,
    pub pos: u32,
    pub layer: u16,
    pub phase: Phase,
    pub ids: &'a [u32],
    pub weights: &'a [f32],
    pub gate: Option<&'a [f32]>,
    pub hidden: Option<&'a [f32]>,
}

impl RecordParts<'_> {
    /// Appends the framed record to `out`; `k` is the header's K.
    pub fn encode(&self, k: usize, out: &mut Vec<u8>) {
        let t = self.ids.len() / k.max(1);
        let start = out.len();
        out.extend_from_slice(REC_MAGIC);
        out.extend_from_slice(&0u32.to_le_bytes());
        let body = out.len();
        out.extend_from_slice(&self.request.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&(t as u32).to_le_bytes());
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.push(match self.phase {
            Phase::Prefill => 0,
            Phase::Decode => 1,
        });
        out.push(u8::from(self.gate.is_some()) | (u8::from(self.hidden.is_some()) << 1));
        for &id in self.ids {
            out.extend_from_slice(&(id as u16).to_le_bytes());
        }
        for &w in self.weights {
            out.extend_from_slice(&f16::from_f32(w).to_le_bytes());
        }
        for &g in self.gate.unwrap_or(&[]) {
            out.extend_from_slice(&g.to_le_bytes());
        }
        for &h in self.hidden.unwrap_or(&[]) {
            out.extend_from_slice(&f16::from_f32(h).to_le_bytes());
        }
        let len = (out.len() - body) as u32;
        out[start + 2..start + 6].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&out[body..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// A whole trace read back.
#[derive(Debug)]
pub struct Trace {
    pub path: PathBuf,
    pub header: Header,
    pub records: Vec<Record>,
    /// Where an incomplete last record starts (a crash cut it): the records before it are
    /// all here; the bytes from here on are not.
    pub truncated_at: Option<u64>,
    /// End of the last whole record.
    pub good_len: u64,
}

/// A little-endian cursor over one record or header body; errors carry the file offset.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
    base: u64,
    path: &'a Path,
}

impl<'a> Cur<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Trace {
            path: self.path.to_path_buf(),
            offset: self.base + self.at as u64,
            msg: msg.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(self.err(format!("{what}: the record body ends early")));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self, w: &str) -> Result<u8> {
        Ok(self.take(1, w)?[0])
    }
    fn u16(&mut self, w: &str) -> Result<u16> {
        let s = self.take(2, w)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, w: &str) -> Result<u32> {
        let s = self.take(4, w)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, w: &str) -> Result<u64> {
        let s = self.take(8, w)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn f16s(&mut self, n: usize, w: &str) -> Result<Vec<f32>> {
        let s = self.take(n * 2, w)?;
        Ok(s.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect())
    }
}

fn parse_header(path: &Path, b: &[u8]) -> Result<(Header, usize)> {
    let bad = |offset: u64, msg: String| Error::Trace {
        path: path.to_path_buf(),
        offset,
        msg,
    };
    if b.len() < 14 {
        return Err(bad(
            0,
            format!("{} bytes: too short for a trace header", b.len()),
        ));
    }
    if &b[..8] != MAGIC {
        return Err(bad(
            0,
            "not a flashmoe routing trace (no FMTRACE magic)".into(),
        ));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(bad(
            8,
            format!("trace format version {version}; this flashmoe reads version {VERSION}"),
        ));
    }
    let n = u32::from_le_bytes([b[10], b[11], b[12], b[13]]) as usize;
    if b.len() < 14 + n + 4 {
        return Err(bad(14, "the header is cut short".into()));
    }
    let body = &b[14..14 + n];
    let crc = u32::from_le_bytes([b[14 + n], b[15 + n], b[16 + n], b[17 + n]]);
    if crc32fast::hash(body) != crc {
        return Err(bad(14, "header checksum mismatch (damaged file)".into()));
    }
    let mut c = Cur {
        b: body,
        at: 0,
        base: 14,
        path,
    };
    let flags = c.u16("flags")?;
    let layers = c.u16("layers")?;
    let experts = c.u32("experts")?;
    let k = c.u16("K")?;
    let hidden = c.u32("hidden")?;
    let expert_bytes = c.u64("expert bytes")?;
    let nm = c.u16("MoE layer count")? as usize;
    let mut moe_layers = Vec::with_capacity(nm);
    for _ in 0..nm {
        moe_layers.push(c.u16("MoE layer")?);
    }
    let idn = c.u16("model id length")? as usize;
    let model_id = String::from_utf8_lossy(c.take(idn, "model id")?).into_owned();
    if k == 0 || experts == 0 || u32::from(k) > experts {
        return Err(c.err(format!("K {k} with {experts} experts")));
    }
    let h = Header {
        flags,
        layers,
        experts,
        k,
        hidden,
        expert_bytes,
        moe_layers,
        model_id,
    };
    Ok((h, 14 + n + 4))
}

fn parse_record(h: &Header, path: &Path, body: &[u8], base: u64) -> Result<Record> {
    let mut c = Cur {
        b: body,
        at: 0,
        base,
        path,
    };
    let request = c.u64("request")?;
    let pos = c.u32("position")?;
    let t = c.u32("tokens")?;
    let layer = c.u16("layer")?;
    let phase = match c.u8("phase")? {
        0 => Phase::Prefill,
        1 => Phase::Decode,
        p => return Err(c.err(format!("phase {p} (expected 0 prefill or 1 decode)"))),
    };
    let flags = c.u8("flags")?;
    if h.moe_index(layer).is_none() {
        return Err(c.err(format!(
            "layer {layer} is not one of the header's MoE layers"
        )));
    }
    let tk = t as usize * h.k as usize;
    let raw = c.take(tk * 2, "expert ids")?;
    let ids: Vec<u16> = raw
        .chunks_exact(2)
        .map(|x| u16::from_le_bytes([x[0], x[1]]))
        .collect();
    if let Some(bad) = ids.iter().find(|&&e| u32::from(e) >= h.experts) {
        return Err(c.err(format!(
            "expert id {bad} out of range (the header says {} experts)",
            h.experts
        )));
    }
    let weights = c.f16s(tk, "weights")?;
    let gate = if flags & 1 != 0 {
        let s = c.take(t as usize * 4, "shared gate")?;
        Some(
            s.chunks_exact(4)
                .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .collect(),
        )
    } else {
        None
    };
    let hidden = if flags & 2 != 0 {
        Some(c.f16s(t as usize * h.hidden as usize, "hidden state")?)
    } else {
        None
    };
    if c.at != body.len() {
        return Err(c.err(format!(
            "{} bytes left over in a record of {t} tokens",
            body.len() - c.at
        )));
    }
    Ok(Record {
        request,
        pos,
        t,
        layer,
        phase,
        ids,
        weights,
        gate,
        hidden,
    })
}

/// Bytes of a record body from its fixed part (the first 20 bytes of `body`), if present.
fn body_len(h: &Header, body: &[u8]) -> Option<usize> {
    if body.len() < 20 {
        return None;
    }
    let t = u32::from_le_bytes([body[12], body[13], body[14], body[15]]) as usize;
    let flags = body[19];
    let tk = t * h.k as usize;
    let gate = if flags & 1 != 0 { 4 * t } else { 0 };
    let hidden = if flags & 2 != 0 {
        2 * t * h.hidden as usize
    } else {
        0
    };
    Some(20 + 4 * tk + gate + hidden)
}

impl Trace {
    /// Reads a trace. An incomplete last record is not an error (see `truncated_at`); a
    /// damaged one is, naming its offset.
    pub fn read(path: &Path) -> Result<Trace> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, &b)
    }

    pub fn parse(path: &Path, b: &[u8]) -> Result<Trace> {
        let (header, mut at) = parse_header(path, b)?;
        let mut records = Vec::new();
        let mut truncated_at = None;
        while at < b.len() {
            if b.len() - at < 6 {
                truncated_at = Some(at as u64);
                break;
            }
            if &b[at..at + 2] != REC_MAGIC {
                return Err(Error::Trace {
                    path: path.to_path_buf(),
                    offset: at as u64,
                    msg: "no record magic where a record starts (damaged file)".into(),
                });
            }
            let n = u32::from_le_bytes([b[at + 2], b[at + 3], b[at + 4], b[at + 5]]) as usize;
            // The length a record of its token count and flags has: a damaged length field
            // must not pass for a cut tail (and hide every record after it).
            if let Some(want) = body_len(&header, &b[at + 6..]) {
                if want != n {
                    return Err(Error::Trace {
                        path: path.to_path_buf(),
                        offset: at as u64 + 2,
                        msg: format!(
                            "record length {n} where its token count and flags make {want}                              (damaged file)"
                        ),
                    });
                }
            }
            let end = at + 6 + n + 4;
            if end > b.len() {
                truncated_at = Some(at as u64);
                break;
            }
            let body = &b[at + 6..at + 6 + n];
            let crc = u32::from_le_bytes([b[end - 4], b[end - 3], b[end - 2], b[end - 1]]);
            if crc32fast::hash(body) != crc {
                return Err(Error::Trace {
                    path: path.to_path_buf(),
                    offset: at as u64,
                    msg: "record checksum mismatch (damaged file)".into(),
                });
            }
            records.push(parse_record(&header, path, body, (at + 6) as u64)?);
            at = end;
        }
        let good_len = truncated_at.unwrap_or(at as u64);
        Ok(Trace {
            path: path.to_path_buf(),
            header,
            records,
            truncated_at,
            good_len,
        })
    }

    /// A line for stderr when the tail was cut, else `None`.
    pub fn tail_note(&self) -> Option<String> {
        self.truncated_at.map(|o| {
            format!(
                "{}: the last record (from byte offset {o}) is incomplete, as a crash leaves it; \
                 using the {} whole records before it",
                self.path.display(),
                self.records.len()
            )
        })
    }
}

/// Appends records to a trace file, one `write_all` per batch (a forward call's records).
pub struct TraceWriter {
    file: File,
    path: PathBuf,
    /// The request id after the last one already in an appended file (0 for a new file).
    pub next_request: u64,
}

impl TraceWriter {
    /// Creates `path` with `header`, or opens an existing trace of the same header for
    /// appending (its cut tail, if any, is removed first and described in the returned note).
    pub fn open(path: &Path, header: &Header) -> Result<(TraceWriter, Option<String>)> {
        let exists = std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let mut note = None;
        let mut next_request = 0;
        if exists {
            let old = Trace::read(path)?;
            next_request = old.records.iter().map(|r| r.request + 1).max().unwrap_or(0);
            if old.header != *header {
                return Err(Error::Trace {
                    path: path.to_path_buf(),
                    offset: 0,
                    msg: format!(
                        "recorded on another model or shape ({} layers, {} experts, K {}, \
                         model `{}`) than this run's ({} layers, {} experts, K {}, model `{}`); \
                         give a new file",
                        old.header.layers,
                        old.header.experts,
                        old.header.k,
                        old.header.model_id,
                        header.layers,
                        header.experts,
                        header.k,
                        header.model_id
                    ),
                });
            }
            if let Some(at) = old.truncated_at {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(path, e))?;
                f.set_len(at).map_err(|e| Error::io(path, e))?;
                note = Some(format!(
                    "{}: removed an incomplete last record (from byte offset {at}) before \
                     appending",
                    path.display()
                ));
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        if !exists {
            file.write_all(&header.encode())
                .map_err(|e| Error::io(path, e))?;
        }
        Ok((
            TraceWriter {
                file,
                path: path.to_path_buf(),
                next_request,
            },
            note,
        ))
    }

    /// Appends already framed records.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }
}
