//! GPU-side timing of what the backend records: timestamp queries written around each
//! dispatch (and, where the adapter allows timestamps inside encoders, each copy and clear)
//! while a trace is on, summed per kernel entry point like CUDA's `kernel_trace`. The wall
//! time of the traced work beside the sum of the kernels' times and the device's span (first
//! start to last end) says where a token's time goes: in kernels, between them on the
//! device (barriers, idle waiting for submissions), or on the host.
use std::collections::BTreeMap;

use flashmoe_core::error::Result;
use serde_json::{json, Value};

use crate::device::Wgpu;
use crate::op_err;

/// Queries per trace (wgpu's most per query set): two per timed command.
const QUERIES: u32 = wgpu::QUERY_SET_MAX_QUERIES;

/// The timestamp features an adapter offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamps {
    /// At the start and end of a compute pass (`TIMESTAMP_QUERY`).
    pub pass: bool,
    /// Between commands of an encoder (`TIMESTAMP_QUERY_INSIDE_ENCODERS`): copies and clears.
    pub encoder: bool,
    /// Between dispatches of one pass (`TIMESTAMP_QUERY_INSIDE_PASSES`).
    pub inside_pass: bool,
}

impl Stamps {
    /// The timestamp features of `offered` worth requesting.
    pub fn request(offered: wgpu::Features) -> wgpu::Features {
        offered
            & (wgpu::Features::TIMESTAMP_QUERY
                | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
                | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    }

    pub fn of(f: wgpu::Features) -> Stamps {
        Stamps {
            pass: f.contains(wgpu::Features::TIMESTAMP_QUERY),
            encoder: f.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS),
            inside_pass: f.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
        }
    }
}

/// One timed command: its kernel (or `copy`, `clear`), weight bytes it reads, first query.
struct Cmd {
    name: String,
    bytes: u64,
    q: u32,
}

/// A trace being recorded.
pub(crate) struct Trace {
    set: Option<wgpu::QuerySet>,
    next: u32,
    cmds: Vec<Cmd>,
    /// Commands recorded without timestamps (copies without encoder timestamps, a full set).
    untimed: BTreeMap<String, u64>,
    /// Weight bytes the next dispatch reads ([`Wgpu::note_bytes`]).
    bytes: u64,
}

impl Trace {
    /// Two queries for the next command `name` (encoder timestamps are needed when it is not
    /// a dispatch: `in_encoder`), or `None` with the command counted as untimed.
    pub fn take(
        &mut self,
        name: &str,
        in_encoder: bool,
        stamps: Stamps,
    ) -> Option<(wgpu::QuerySet, u32)> {
        let bytes = std::mem::take(&mut self.bytes);
        let ok = if in_encoder {
            stamps.encoder
        } else {
            stamps.pass
        };
        match &self.set {
            Some(set) if ok && self.next + 2 <= QUERIES => {
                let q = self.next;
                self.next += 2;
                self.cmds.push(Cmd {
                    name: name.to_string(),
                    bytes,
                    q,
                });
                Some((set.clone(), q))
            }
            _ => {
                *self.untimed.entry(name.to_string()).or_default() += 1;
                None
            }
        }
    }
}

/// One kernel's (or transfer's) share of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub kernel: String,
    pub launches: u64,
    pub total_us: f64,
    /// Weight bytes its launches read (products only; 0 elsewhere).
    pub weight_bytes: u64,
}

/// What a trace measured.
#[derive(Clone, Debug, Default)]
pub struct TraceReport {
    /// Why nothing was timed (`None`: timed).
    pub unavailable: Option<String>,
    /// By total time, largest first.
    pub kernels: Vec<KernelTime>,
    /// Sum of the timed commands' times.
    pub sum_us: f64,
    /// First timed start to last timed end on the device.
    pub span_us: f64,
    /// Commands recorded but not timed, by name.
    pub untimed: Vec<(String, u64)>,
    /// Every timed command in recording order: name, start (from the first), duration.
    pub timeline: Vec<(String, f64, f64)>,
}

impl TraceReport {
    /// The report as JSON, beside `wall_us` (the host's time for the traced work).
    pub fn json(&self, wall_us: f64) -> Value {
        let kernels: Vec<Value> = self
            .kernels
            .iter()
            .map(|k| {
                json!({
                    "kernel": k.kernel,
                    "launches": k.launches,
                    "total_us": k.total_us,
                    "per_launch_us": k.total_us / k.launches.max(1) as f64,
                    "weight_bytes": k.weight_bytes,
                    "gbps": (k.weight_bytes > 0 && k.total_us > 0.0)
                        .then(|| k.weight_bytes as f64 / k.total_us / 1e3),
                })
            })
            .collect();
        let timeline: Vec<Value> = self
            .timeline
            .iter()
            .map(|(n, s, d)| json!([n, (s * 100.0).round() / 100.0, (d * 100.0).round() / 100.0]))
            .collect();
        json!({
            "note": "GPU timestamps before and after each command of the traced work (wgpu inserts a barrier between dependent dispatches): total_us per kernel; span_us first start to last end on the device; gaps_us = span - sum (barriers, the device idle between submissions)",
            "timestamps": self.unavailable.clone().unwrap_or_else(|| "on".into()),
            "wall_us": wall_us,
            "span_us": self.span_us,
            "sum_us": self.sum_us,
            "gaps_us": self.span_us - self.sum_us,
            "untimed": self.untimed.iter().map(|(n, c)| json!({"kernel": n, "launches": c})).collect::<Vec<_>>(),
            "kernels": kernels,
            "timeline": timeline,
        })
    }
}

/// A trace's JSON ([`TraceReport::json`]) as table lines: kernel, launches, total µs, µs per
/// launch, GB/s of weights read; then the wall time, the device's span and the sum.
pub fn trace_table(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if v["timestamps"] != "on" {
        out.push(format!(
            "wgpu kernel trace: no GPU timestamps ({})",
            v["timestamps"].as_str().unwrap_or("?")
        ));
    }
    out.push(format!(
        "{:<36} {:>8} {:>11} {:>10} {:>8}",
        "kernel", "launches", "total_us", "us/launch", "GB/s"
    ));
    for k in v["kernels"].as_array().into_iter().flatten() {
        let gbps = k["gbps"]
            .as_f64()
            .map_or_else(|| "-".to_string(), |g| format!("{g:.1}"));
        out.push(format!(
            "{:<36} {:>8} {:>11.1} {:>10.2} {:>8}",
            k["kernel"].as_str().unwrap_or("?"),
            k["launches"],
            k["total_us"].as_f64().unwrap_or(0.0),
            k["per_launch_us"].as_f64().unwrap_or(0.0),
            gbps
        ));
    }
    for k in v["untimed"].as_array().into_iter().flatten() {
        out.push(format!(
            "{:<36} {:>8} {:>11}",
            k["kernel"].as_str().unwrap_or("?"),
            k["launches"],
            "untimed"
        ));
    }
    out.push(format!(
        "wall {:.1} us, device span {:.1} us, kernels {:.1} us, gaps {:.1} us",
        f("wall_us"),
        f("span_us"),
        f("sum_us"),
        f("gaps_us")
    ));
    out
}

impl Wgpu {
    /// Whether traces are timed (the device has timestamp queries and they are not turned
    /// off).
    pub fn timestamps(&self) -> bool {
        self.stamps.pass
    }

    /// Turns timestamps off for later traces (`false`), as on an adapter without them, or
    /// back to what the device has (`true`).
    pub fn set_timestamps(&mut self, on: bool) {
        self.stamps = if on {
            self.device_stamps
        } else {
            Stamps::default()
        };
    }

    /// Starts timing what is recorded from here (after the device has finished what was
    /// recorded before). Without timestamp queries the commands are only counted.
    pub fn trace_start(&self) -> Result<()> {
        self.wait()?;
        let set = self.stamps.pass.then(|| {
            self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("trace"),
                ty: wgpu::QueryType::Timestamp,
                count: QUERIES,
            })
        });
        *self.trace_lock()? = Some(Trace {
            set,
            next: 0,
            cmds: Vec::new(),
            untimed: BTreeMap::new(),
            bytes: 0,
        });
        Ok(())
    }

    /// Ends the trace: waits for the device and reads the timestamps back.
    pub fn trace_finish(&self) -> Result<TraceReport> {
        self.wait()?;
        let tr = self
            .trace_lock()?
            .take()
            .ok_or_else(|| op_err("trace", "no trace was started"))?;
        let mut rep = TraceReport {
            untimed: tr.untimed.into_iter().collect(),
            ..Default::default()
        };
        let period = self.queue.get_timestamp_period() as f64;
        let set = match (&tr.set, period > 0.0) {
            (Some(s), true) if tr.next > 0 => s,
            (None, _) => {
                rep.unavailable = Some(if self.device_stamps.pass {
                    "TIMESTAMP_QUERY turned off".to_string()
                } else {
                    format!("adapter {} offers no TIMESTAMP_QUERY", self.desc.name)
                });
                return Ok(rep);
            }
            _ => {
                rep.unavailable = Some("nothing timed".into());
                return Ok(rep);
            }
        };
        let bytes = tr.next as u64 * 8;
        self.count_buffer();
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let n = tr.next;
        self.with_encoder_named("resolve", |enc| {
            enc.resolve_query_set(set, 0..n, &resolved, 0)
        })?;
        let raw: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read(&resolved, bytes)?);
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 * period / 1e3;
        let t0 = tr.cmds.iter().map(|c| raw[c.q as usize]).min().unwrap_or(0);
        let t1 = tr
            .cmds
            .iter()
            .map(|c| raw[c.q as usize + 1])
            .max()
            .unwrap_or(0);
        rep.span_us = us(t0, t1);
        let mut by: BTreeMap<String, KernelTime> = BTreeMap::new();
        for c in &tr.cmds {
            let (a, b) = (raw[c.q as usize], raw[c.q as usize + 1]);
            let d = us(a, b);
            rep.sum_us += d;
            rep.timeline.push((c.name.clone(), us(t0, a), d));
            let k = by.entry(c.name.clone()).or_insert_with(|| KernelTime {
                kernel: c.name.clone(),
                launches: 0,
                total_us: 0.0,
                weight_bytes: 0,
            });
            k.launches += 1;
            k.total_us += d;
            k.weight_bytes += c.bytes;
        }
        rep.kernels = by.into_values().collect();
        rep.kernels
            .sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        Ok(rep)
    }

    /// Weight bytes the next dispatch reads, for a trace's GB/s (nothing when no trace is on).
    pub(crate) fn note_bytes(&self, bytes: u64) {
        if let Ok(mut t) = self.trace.lock() {
            if let Some(t) = t.as_mut() {
                t.bytes = bytes;
            }
        }
    }

    /// Queries for the next command `name` while a trace is on (see [`Trace::take`]).
    pub(crate) fn trace_take(
        &self,
        name: &str,
        in_encoder: bool,
    ) -> Result<Option<(wgpu::QuerySet, u32)>> {
        Ok(self
            .trace_lock()?
            .as_mut()
            .and_then(|t| t.take(name, in_encoder, self.stamps)))
    }

    fn trace_lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Trace>>> {
        self.trace
            .lock()
            .map_err(|_| op_err("trace", "lock poisoned"))
    }
}
