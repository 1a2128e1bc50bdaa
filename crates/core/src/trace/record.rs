//! The recording side of a routing trace: one process-wide [`Recorder`] (installed by the
//! front end that was given `--trace-routing`, like the int8-activation switch), and the
//! [`RecordTap`] that [`crate::model::Model::forward`] wraps around its own tap while one is
//! installed. A forward call's records are framed in memory and written with one `write_all`
//! when the call returns, so a crash cuts at most the last call's records.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::backend::{Backend, ExpertTimes};
use crate::error::{Error, Result};
use crate::model::tap::{Routing, Tap};
use crate::model::{Ffn, Model};

use super::format::{Header, Phase, RecordParts, TraceWriter, FLAG_HIDDEN};

/// Where a process's routing records go. The file is opened (created, or checked and
/// appended to) by [`Recorder::open_for`] once the model is known, or at the first forward
/// call of a model loaded elsewhere (the server's).
pub struct Recorder {
    path: PathBuf,
    model_id: String,
    hidden: bool,
    open: Mutex<Option<(TraceWriter, Header)>>,
    /// The current request id, and whether it has no records yet.
    request: Mutex<(u64, bool)>,
    /// 0: by the call's length (one token decode, more prefill); 1 prefill; 2 decode.
    phase: AtomicU8,
}

static ACTIVE: OnceLock<Arc<Recorder>> = OnceLock::new();

/// Makes `rec` the recorder every forward pass of this process writes to (once).
pub fn install(rec: Arc<Recorder>) -> Result<()> {
    ACTIVE
        .set(rec)
        .map_err(|_| Error::Invalid("a routing trace is already being recorded".into()))
}

/// The installed recorder, if any.
pub fn active() -> Option<&'static Arc<Recorder>> {
    ACTIVE.get()
}

/// The trace header of `model`'s routing.
pub fn header_of<B: Backend>(model: &Model<B>, model_id: &str, hidden: bool) -> Result<Header> {
    let cfg = &model.cfg;
    if cfg.num_experts > u16::MAX as usize || cfg.num_layers > u16::MAX as usize {
        return Err(Error::Invalid(format!(
            "--trace-routing: {} experts / {} layers do not fit the trace format's 16-bit ids",
            cfg.num_experts, cfg.num_layers
        )));
    }
    let moe_layers: Vec<u16> = model
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.ffn, Ffn::Moe(_)))
        .map(|(i, _)| i as u16)
        .collect();
    Ok(Header {
        flags: if hidden { FLAG_HIDDEN } else { 0 },
        layers: cfg.num_layers as u16,
        experts: cfg.num_experts as u32,
        k: model.top_k as u16,
        hidden: cfg.hidden_size as u32,
        expert_bytes: model.experts.expert_bytes() as u64,
        moe_layers,
        model_id: model_id.to_string(),
    })
}

impl Recorder {
    /// A recorder for `path`; `hidden` also records each MoE layer's router input.
    pub fn new(path: &Path, model_id: &str, hidden: bool) -> Recorder {
        Recorder {
            path: path.to_path_buf(),
            model_id: model_id.to_string(),
            hidden,
            open: Mutex::new(None),
            request: Mutex::new((0, true)),
            phase: AtomicU8::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(TraceWriter, Header)>> {
        // A panic mid-write leaves at worst a cut record, which the format detects.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the file for `model` (creating it, or appending to a trace of the same model
    /// after cutting off an incomplete tail). Returns a note for stderr about such a cut.
    pub fn open_for<B: Backend>(&self, model: &Model<B>) -> Result<Option<String>> {
        let mut g = self.lock();
        if g.is_some() {
            return Ok(None);
        }
        let header = header_of(model, &self.model_id, self.hidden)?;
        let (writer, note) = TraceWriter::open(&self.path, &header)?;
        // Request ids continue after an appended file's last one.
        let next = writer.next_request;
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        r.0 = r.0.max(next);
        *g = Some((writer, header));
        Ok(note)
    }

    /// Starts a new request (a generation of the engine): later records carry the next id.
    /// A forward call from position 0 (a fresh sequence) starts one too.
    pub fn begin_request(&self) {
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        if !r.1 {
            *r = (r.0 + 1, true);
        }
    }

    /// The id of a forward call's records from position `pos`.
    fn request_for(&self, pos: usize) -> u64 {
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        if pos == 0 && !r.1 {
            r.0 += 1;
        }
        r.1 = false;
        r.0
    }

    /// Labels the following forward calls (`None`: by their length).
    pub fn set_phase(&self, p: Option<Phase>) {
        let v = match p {
            None => 0,
            Some(Phase::Prefill) => 1,
            Some(Phase::Decode) => 2,
        };
        self.phase.store(v, Ordering::Relaxed);
    }

    /// Runs `f` (a forward call of `model` over `t` tokens from position `pos`) with `inner`
    /// wrapped in a recording tap, then writes what it recorded.
    pub fn run<B: Backend, T, R>(
        &self,
        model: &Model<B>,
        pos: usize,
        t: usize,
        inner: T,
        f: impl FnOnce(&mut RecordTap<'_, T>) -> Result<R>,
    ) -> Result<R> {
        if let Some(note) = self.open_for(model)? {
            eprintln!("note: {note}");
        }
        let phase = match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Prefill,
            2 => Phase::Decode,
            _ if t == 1 => Phase::Decode,
            _ => Phase::Prefill,
        };
        let mut tap = RecordTap {
            inner,
            rec: self,
            k: model.top_k,
            pos: pos as u32,
            phase,
            request: self.request_for(pos),
            buf: Vec::new(),
        };
        let r = f(&mut tap)?;
        if !tap.buf.is_empty() {
            if let Some((w, _)) = self.lock().as_mut() {
                w.write(&tap.buf)?;
            }
        }
        Ok(r)
    }
}

/// Passes every point to `inner` and frames each MoE layer's routing as a trace record.
pub struct RecordTap<'r, T> {
    pub inner: T,
    rec: &'r Recorder,
    k: usize,
    pos: u32,
    phase: Phase,
    request: u64,
    buf: Vec<u8>,
}

impl<B: Backend, T: Tap<B>> Tap<B> for RecordTap<'_, T> {
    fn tap(
        &mut self,
        be: &B,
        name: &'static str,
        layer: Option<usize>,
        x: Option<&B::Buf>,
    ) -> Result<()> {
        self.inner.tap(be, name, layer, x)
    }
    fn wants(&self, name: &'static str) -> bool {
        name == "routing" || self.inner.wants(name)
    }
    fn expert_times(&mut self, layer: usize, t: ExpertTimes) {
        self.inner.expert_times(layer, t)
    }
    fn routing(&mut self, be: &B, layer: usize, r: &Routing<'_, B>) -> Result<()> {
        self.inner.routing(be, layer, r)?;
        let routes = r.routes.ok_or_else(|| {
            Error::Invalid(format!(
                "--trace-routing: layer {layer}'s routing stayed on the {} backend",
                be.name()
            ))
        })?;
        let gate = match r.shared_gate {
            Some(g) => Some(be.download(g)?),
            None => None,
        };
        let hidden = if self.rec.hidden {
            Some(be.download(r.input)?)
        } else {
            None
        };
        RecordParts {
            request: self.request,
            pos: self.pos,
            layer: layer as u16,
            phase: self.phase,
            ids: &routes.ids,
            weights: &routes.weights,
            gate: gate.as_deref(),
            hidden: hidden.as_deref(),
        }
        .encode(self.k, &mut self.buf);
        Ok(())
    }
}
