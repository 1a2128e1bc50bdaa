//! The device side: adapter listing and choice, buffers, the kernel pipelines (compiled on
//! first use), dispatch into one pending command encoder, and read-back.
//!
//! Every buffer the ops write is created with its contents (`create_buffer_init`) or zeroed,
//! never written with `queue.write_buffer`: such a write lands before the pending encoder's
//! commands when they are submitted, so batching dispatches in one encoder is safe only
//! without it.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use flashmoe_core::error::Result;
use flashmoe_core::residency::TierCell;
use wgpu::util::DeviceExt;

use crate::shaders::{Fast, Form};
use crate::{op_err, WgpuError};

/// Commands recorded before the pending encoder is submitted, by default: on a GPU a short
/// batch lets the device start while the host records the rest of a token (the bench measures
/// others, `Wgpu::set_submit_batch`); a software adapter runs a submission on the host's threads.
const BATCH_GPU: usize = 32;
const BATCH_SOFTWARE: usize = 256;
/// Bytes of one dispatch's parameters (16 words).
const PARAMS: u64 = 64;

/// What is recorded and not yet submitted: the encoder, its command count, and the uniform
/// parameters of its dispatches. The parameters go to a host copy of the arena, one slot per
/// dispatch, written to the device arena by one `queue.write_buffer` at submission: that write
/// lands before this submission's commands (the only readers of these slots) and after the
/// earlier submissions' (queue order), so one arena serves every batch. A fresh arena mapped
/// at creation per batch cost a buffer creation, a mapping and a staging copy per submission.
#[derive(Default)]
struct Pending {
    enc: Option<wgpu::CommandEncoder>,
    /// The compute pass open in `enc` when dispatches share one ([`Wgpu::set_one_pass`]);
    /// ended before any other command and before submission.
    pass: Option<wgpu::ComputePass<'static>>,
    n: usize,
    arena: Option<wgpu::Buffer>,
    host: Vec<u8>,
    used: u64,
}

/// Host-side work of the backend, counted since the device was opened (see
/// [`Wgpu::host_counters`]): deterministic for a given sequence of ops, unlike timings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Kernel dispatches recorded.
    pub dispatches: u64,
    /// Copies and clears recorded.
    pub transfers: u64,
    /// Bind groups created.
    pub bind_groups: u64,
    /// Device buffers created (weights, outputs, staging, parameter arenas).
    pub buffers: u64,
    /// Expert slot fills written through the queue: a staging copy into the slot on the
    /// device (discrete slots, `slots.rs`).
    pub slot_copies: u64,
    /// Expert slot fills written in place through a mapping, no device copy (unified slots).
    pub slot_maps: u64,
    /// Queue submissions.
    pub submissions: u64,
    /// Host waits for the device (`poll` until idle).
    pub waits: u64,
    /// Nanoseconds the host spent recording dispatches, copies and clears (parameters, bind
    /// groups, encoding), submissions not counted; not deterministic.
    pub record_ns: u64,
    /// Nanoseconds in `queue.submit` (with the parameters' write): a software adapter may
    /// run the shaders there.
    pub submit_ns: u64,
}

impl HostCounters {
    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &HostCounters) -> HostCounters {
        HostCounters {
            dispatches: self.dispatches - earlier.dispatches,
            transfers: self.transfers - earlier.transfers,
            bind_groups: self.bind_groups - earlier.bind_groups,
            buffers: self.buffers - earlier.buffers,
            slot_copies: self.slot_copies - earlier.slot_copies,
            slot_maps: self.slot_maps - earlier.slot_maps,
            submissions: self.submissions - earlier.submissions,
            waits: self.waits - earlier.waits,
            record_ns: self.record_ns - earlier.record_ns,
            submit_ns: self.submit_ns - earlier.submit_ns,
        }
    }
}

/// The atomics behind [`HostCounters`].
#[derive(Default)]
struct Counts {
    dispatches: AtomicU64,
    transfers: AtomicU64,
    bind_groups: AtomicU64,
    buffers: AtomicU64,
    slot_copies: AtomicU64,
    slot_maps: AtomicU64,
    submissions: AtomicU64,
    waits: AtomicU64,
    record_ns: AtomicU64,
    submit_ns: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
/// Workgroups along x of a 2D grid (the limit per dimension is 65535).
pub(crate) const GRID_X: u32 = 32768;

/// One adapter as `flashmoe devices` lists it.
#[derive(Clone, Debug)]
pub struct AdapterDesc {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// A CPU implementation (lavapipe, SwiftShader): never chosen by `--backend auto`.
    pub software: bool,
}

/// How to choose the adapter.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Index in [`adapters`]' order; `None`: the first hardware adapter, else (when
    /// `allow_software`) the first one.
    pub adapter: Option<usize>,
    pub allow_software: bool,
    /// Products with one thread per row instead of a workgroup per row; `None`: per
    /// adapter (one thread per row on software adapters, whose barriers are expensive).
    pub row_per_thread: Option<bool>,
    /// The fast affine products in this configuration (unless `row_per_thread` is
    /// `Some(true)`); `None`: per adapter ([`Wgpu::default_fast`] on hardware adapters, none
    /// on software ones).
    pub fast: Option<Fast>,
}

/// Which kernels run the products: `per_row` (one thread per row: software adapters), a
/// workgroup per row, or, for affine matrices whose rows are whole 16-byte chunks, the fast
/// kernels (`fast.wgsl`) with a workgroup per row for the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    PerThread,
    PerWorkgroup,
    Fast(Fast),
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::VULKAN | wgpu::Backends::METAL,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

fn enumerate(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::VULKAN | wgpu::Backends::METAL))
}

fn describe(index: usize, a: &wgpu::Adapter) -> AdapterDesc {
    let i = a.get_info();
    AdapterDesc {
        index,
        name: i.name,
        backend: format!("{:?}", i.backend),
        device_type: format!("{:?}", i.device_type),
        driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
        software: i.device_type == wgpu::DeviceType::Cpu,
    }
}

/// Every Vulkan/Metal adapter of this machine, in the order `--gpu-adapter N` counts.
pub fn adapters() -> Vec<AdapterDesc> {
    let inst = instance();
    enumerate(&inst)
        .iter()
        .enumerate()
        .map(|(i, a)| describe(i, a))
        .collect()
}

/// The wgpu backend: one device and queue, its kernels, and the encoder being recorded.
pub struct Wgpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) desc: AdapterDesc,
    pub(crate) limits: wgpu::Limits,
    pipes: Mutex<HashMap<String, wgpu::ComputePipeline>>,
    pending: Mutex<Pending>,
    /// Commands per submission (see [`BATCH_GPU`]).
    batch: std::sync::atomic::AtomicUsize,
    /// Bytes between two dispatches' parameters in the arena.
    stride: u64,
    /// Routed experts' reads overlap the device's work recorded before them (the shared
    /// expert): what is recorded is submitted, not waited for, before the reads; `false`
    /// (the default) waits for it (serial). The bench measures both.
    overlap: std::sync::atomic::AtomicBool,
    /// Bound where a kernel declares a buffer that an op does not use.
    pub(crate) dummy: wgpu::Buffer,
    /// The product kernels (see [`Products`]).
    pub(crate) products: Products,
    default_fast: Option<Fast>,
    /// The device was created with `SHADER_F16`.
    f16: bool,
    /// The device has `MAPPABLE_PRIMARY_BUFFERS` (requested on unified memory only).
    mappable: bool,
    /// Expert slots allocated from now on are mapped and filled in place (see
    /// [`Wgpu::set_unified_slots`]).
    unified_slots: std::sync::atomic::AtomicBool,
    /// The routed experts' residency tier, when one is enabled (`slots.rs`).
    pub(crate) tier: TierCell<Wgpu>,
    /// Buffers of dropped `GBuf`s, for the next allocation of their size.
    pub(crate) pool: std::sync::Arc<crate::pool::Pool>,
    counts: Counts,
    /// Bind groups kept between dispatches (`bind.rs`).
    binds: Mutex<crate::bind::Cache>,
    /// The timestamp queries traces use (`timing.rs`): the device's unless turned off.
    pub(crate) stamps: crate::timing::Stamps,
    /// The timestamp queries the device has.
    pub(crate) device_stamps: crate::timing::Stamps,
    /// The trace being recorded, if any (`timing.rs`).
    pub(crate) trace: Mutex<Option<crate::timing::Trace>>,
    /// Consecutive dispatches share one compute pass instead of one pass each.
    one_pass: std::sync::atomic::AtomicBool,
    /// Every kernel's pipeline without forced loop bounding (see [`Wgpu::set_lean_kernels`]).
    lean_all: std::sync::atomic::AtomicBool,
}

pub(crate) const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Wgpu {
    /// Opens an adapter by `opts`.
    pub fn new(opts: Options) -> Result<Self, WgpuError> {
        let inst = instance();
        let all = enumerate(&inst);
        if all.is_empty() {
            return Err(WgpuError::NoAdapter);
        }
        let idx = match opts.adapter {
            Some(i) if i >= all.len() => {
                return Err(WgpuError::AdapterIndex {
                    index: i,
                    count: all.len(),
                })
            }
            Some(i) => i,
            None => match all
                .iter()
                .position(|a| a.get_info().device_type != wgpu::DeviceType::Cpu)
            {
                Some(i) => i,
                None if opts.allow_software => 0,
                None => {
                    let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                    return Err(WgpuError::OnlySoftware {
                        names: names.join(", "),
                    });
                }
            },
        };
        let adapter = &all[idx];
        let desc = describe(idx, adapter);
        let limits = adapter.limits();
        // Subgroup operations where the adapter has them (the fast products' reduction), f16
        // in shaders where it has that (the f16 decode form, `Form::Half`, a candidate).
        // Timestamp queries where offered (`timing.rs`: a trace's GPU times).
        let features = adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16);
        let stamps = crate::timing::Stamps::request(adapter.features());
        // Buffers the host maps and shaders read (expert slots filled in place, `slots.rs`),
        // only where device memory is the host's: on a discrete GPU a mappable buffer would
        // sit in host memory that shaders read over the bus.
        let unified = matches!(
            adapter.get_info().device_type,
            wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu
        );
        let mappable = if unified {
            adapter.features() & wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
        } else {
            wgpu::Features::empty()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("flashmoe"),
            required_limits: limits.clone(),
            required_features: features | stamps | mappable,
            ..Default::default()
        }))
        .map_err(|e| WgpuError::Device {
            adapter: desc.name.clone(),
            msg: e.to_string(),
        })?;
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 16,
            usage: USAGE,
            mapped_at_creation: false,
        });
        let info = adapter.get_info();
        let default_fast = default_fast(&info, features, &limits);
        let products = match (opts.row_per_thread, opts.fast) {
            (Some(true), _) => Products::PerThread,
            (_, Some(f)) => {
                if !f.valid() || f.wgs > limits.max_compute_invocations_per_workgroup {
                    return Err(WgpuError::Device {
                        adapter: desc.name.clone(),
                        msg: format!("fast products {f:?} do not fit this adapter"),
                    });
                }
                if f.subgroup && default_fast.map(|d| (d.subgroup, d.lg)) != Some((true, f.lg)) {
                    return Err(WgpuError::Device {
                        adapter: desc.name.clone(),
                        msg: format!("no fixed subgroup size of {} here", f.lg),
                    });
                }
                if matches!(f.form, Form::Half { .. })
                    && !features.contains(wgpu::Features::SHADER_F16)
                {
                    return Err(WgpuError::Device {
                        adapter: desc.name.clone(),
                        msg: format!("no f16 in shaders here for {}", f.spec()),
                    });
                }
                Products::Fast(f)
            }
            (Some(false), None) => Products::PerWorkgroup,
            (None, None) if desc.software => Products::PerThread,
            (None, None) => default_fast.map_or(Products::PerWorkgroup, Products::Fast),
        };
        let batch = if desc.software {
            BATCH_SOFTWARE
        } else {
            BATCH_GPU
        };
        let stride = (limits.min_uniform_buffer_offset_alignment as u64).max(PARAMS);
        Ok(Wgpu {
            f16: features.contains(wgpu::Features::SHADER_F16),
            mappable: !mappable.is_empty(),
            unified_slots: (!mappable.is_empty()).into(),
            products,
            default_fast,
            tier: TierCell::default(),
            pool: Default::default(),
            device,
            queue,
            desc,
            limits,
            pipes: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            batch: batch.into(),
            stride,
            // Serial, as the reference design measured on Apple silicon. On the H100 the two
            // are not told apart yet: in six runs that did not alternate (2026-12-07), the
            // one measured first was 5-10% faster each time, whichever it was; `bench` now
            // alternates them.
            overlap: false.into(),
            dummy,
            counts: Counts::default(),
            binds: Mutex::default(),
            stamps: crate::timing::Stamps::of(stamps),
            device_stamps: crate::timing::Stamps::of(stamps),
            trace: Mutex::new(None),
            // Measured on the H100's Vulkan driver (4d4c7dc): a resident decode token took
            // 4.9 ms with dispatches sharing a pass against 6.4 ms with a pass each, most of
            // it wgpu's submission work per pass (0.7 against 1.9 ms of the host's time).
            one_pass: true.into(),
            // Every kernel without forced loop bounding: a resident token on the H100 took
            // 2.23 against 3.38 ms (2026-12-07, 09f4580; `Wgpu::set_lean_kernels`).
            lean_all: true.into(),
        })
    }

    /// The adapter this backend runs on.
    pub fn adapter(&self) -> &AdapterDesc {
        &self.desc
    }

    /// The product kernels this backend runs.
    pub fn products(&self) -> Products {
        self.products
    }

    /// The fast products' configuration a hardware adapter of this kind gets by default
    /// (`None`: a workgroup of 32 threads is beyond it). With subgroup operations where the
    /// adapter has them at a fixed size.
    pub fn default_fast(&self) -> Option<Fast> {
        self.default_fast
    }

    /// Whether shaders may use f16 here (the device has `SHADER_F16`): [`Form::Half`]
    /// configurations run only where this holds.
    pub fn has_f16(&self) -> bool {
        self.f16
    }

    /// The host-side work counted so far (see [`HostCounters`]).
    pub fn host_counters(&self) -> HostCounters {
        let c = &self.counts;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HostCounters {
            dispatches: l(&c.dispatches),
            transfers: l(&c.transfers),
            bind_groups: l(&c.bind_groups),
            buffers: l(&c.buffers),
            slot_copies: l(&c.slot_copies),
            slot_maps: l(&c.slot_maps),
            submissions: l(&c.submissions),
            waits: l(&c.waits),
            record_ns: l(&c.record_ns),
            submit_ns: l(&c.submit_ns),
        }
    }

    /// The start of a recording: its time, and the submission time so far.
    fn start(&self) -> (Instant, u64) {
        (
            Instant::now(),
            self.counts.submit_ns.load(Ordering::Relaxed),
        )
    }

    /// Adds the time since `start` to `record_ns`, less the submissions' in it.
    fn add_ns(&self, (t, s0): (Instant, u64)) {
        let all = t.elapsed().as_nanos() as u64;
        let sub = self.counts.submit_ns.load(Ordering::Relaxed) - s0;
        self.counts
            .record_ns
            .fetch_add(all.saturating_sub(sub), Ordering::Relaxed);
    }

    /// The largest buffer one binding may cover, in bytes.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Counts a buffer created outside [`Wgpu::buffer`] and [`Wgpu::buffer_with`].
    pub(crate) fn count_buffer(&self) {
        bump(&self.counts.buffers);
    }

    /// A zeroed buffer of `bytes` (at least 16, a multiple of 4).
    pub(crate) fn buffer(&self, bytes: u64) -> wgpu::Buffer {
        bump(&self.counts.buffers);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(16).next_multiple_of(4),
            usage: USAGE,
            mapped_at_creation: false,
        })
    }

    /// A buffer holding `data` (padded with zeros to 16 bytes and a multiple of 4).
    pub(crate) fn buffer_with(&self, data: &[u8]) -> wgpu::Buffer {
        bump(&self.counts.buffers);
        let n = data.len().max(16).next_multiple_of(4);
        if n == data.len() {
            return self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: data,
                    usage: USAGE,
                });
        }
        let mut v = data.to_vec();
        v.resize(n, 0);
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: &v,
                usage: USAGE,
            })
    }

    fn pipeline(&self, name: &str) -> Result<wgpu::ComputePipeline> {
        let key = self.pipe_key(name);
        let mut p = self
            .pipes
            .lock()
            .map_err(|_| op_err("pipeline", "lock poisoned"))?;
        if let Some(x) = p.get(key.as_ref()) {
            return Ok(x.clone());
        }
        let (src, entry) = crate::shaders::source(name)
            .ok_or_else(|| op_err("pipeline", format!("no kernel named {name}")))?;
        let bgl = crate::bind::layout(&self.device, name, &src, entry)?;
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(name),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        let module = if crate::shaders::lean(name) || self.lean_kernels() {
            let checks = wgpu::ShaderRuntimeChecks {
                force_loop_bounding: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            };
            // SAFETY: only loop bounding is off (bounds and division checks stay on), and
            // every loop of the kernels ends by its own bound (see `Fast::lean`,
            // `Wgpu::set_lean_kernels`).
            unsafe { self.device.create_shader_module_trusted(desc, checks) }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipe = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        p.insert(key.into_owned(), pipe.clone());
        Ok(pipe)
    }

    /// Commands per submission.
    pub fn submit_batch(&self) -> usize {
        self.batch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the commands per submission (at least 1); what is recorded is submitted first.
    pub fn set_submit_batch(&self, n: usize) -> Result<()> {
        self.flush()?;
        self.batch
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether expert reads overlap the device's earlier work (see the field).
    pub fn overlap(&self) -> bool {
        self.overlap.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets [`Wgpu::overlap`].
    pub fn set_overlap(&self, on: bool) {
        self.overlap.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Before a layer's expert reads: the device starts on what is recorded (overlapped) or
    /// finishes it (serial).
    pub(crate) fn before_reads(&self) -> Result<()> {
        if self.overlap() {
            self.flush()
        } else {
            self.wait()
        }
    }

    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Pending>> {
        self.pending
            .lock()
            .map_err(|_| op_err("encode", "lock poisoned"))
    }

    /// Submits `g`'s commands, their parameters written to the arena first.
    fn submit(&self, g: &mut Pending) {
        let t = Instant::now();
        if let (Some(a), true) = (&g.arena, g.used > 0) {
            let n = (g.used * self.stride) as usize;
            self.queue.write_buffer(a, 0, &g.host[..n]);
        }
        g.pass = None;
        if let Some(e) = g.enc.take() {
            bump(&self.counts.submissions);
            self.queue.submit([e.finish()]);
        }
        g.n = 0;
        g.used = 0;
        self.counts
            .submit_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The pending encoder, with no pass open in it.
    fn encoder<'a>(&self, g: &'a mut Pending) -> &'a mut wgpu::CommandEncoder {
        g.pass = None;
        g.enc.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }

    /// Counts a recorded command; submits when the batch is full.
    fn recorded(&self, g: &mut Pending) {
        g.n += 1;
        if g.n >= self.submit_batch() {
            self.submit(g);
        }
    }

    /// Records `f` (a copy, clear or resolve) into the pending encoder, between timestamps
    /// while a trace is on and the device has them inside encoders.
    fn with_encoder(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        self.with_encoder_named("copy", f)
    }

    pub(crate) fn with_encoder_named(
        &self,
        name: &str,
        f: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        let t = self.start();
        bump(&self.counts.transfers);
        let q = self.trace_take(name, true)?;
        let mut g = self.pending()?;
        let enc = self.encoder(&mut g);
        match &q {
            Some((set, i)) => {
                enc.write_timestamp(set, *i);
                f(enc);
                enc.write_timestamp(set, i + 1);
            }
            None => f(enc),
        }
        self.recorded(&mut g);
        drop(g);
        self.add_ns(t);
        Ok(())
    }

    /// Whether consecutive dispatches share one compute pass.
    pub fn one_pass(&self) -> bool {
        self.one_pass.load(Ordering::Relaxed)
    }

    /// Sets [`Wgpu::one_pass`]; what is recorded is submitted first.
    pub fn set_one_pass(&self, on: bool) -> Result<()> {
        self.flush()?;
        self.one_pass.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether every kernel runs without naga's forced loop bounding (the fast products'
    /// `lean` configurations apart, which always do).
    pub fn lean_kernels(&self) -> bool {
        self.lean_all.load(Ordering::Relaxed)
    }

    /// Every kernel dispatched from now on without naga's forced loop bounding (bounds checks
    /// stay on; `Fast::lean` says why it may matter): an A/B switch for a whole token. Every
    /// kernel's loops end by their own bounds (parameters or constants, steps that cannot wrap
    /// for the sizes the ops accept). Pipelines and kept bind groups of each setting are
    /// cached apart.
    pub fn set_lean_kernels(&self, on: bool) -> Result<()> {
        self.flush()?;
        self.lean_all.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether expert slots allocated from now on are unified: buffers the host writes
    /// through a mapping and shaders read, so a fill makes no device copy. By default where
    /// the adapter is unified memory (integrated or CPU) and offers
    /// `MAPPABLE_PRIMARY_BUFFERS`.
    pub fn unified_slots(&self) -> bool {
        self.unified_slots.load(Ordering::Relaxed)
    }

    /// Chooses unified (`true`) or staged (`false`, a discrete GPU's) expert slots for tiers
    /// enabled from now on; `true` fails where the device has no mappable storage buffers.
    pub fn set_unified_slots(&self, on: bool) -> Result<()> {
        if on && !self.mappable {
            return Err(op_err(
                "set_unified_slots",
                format!(
                    "{} ({}) has no mappable storage buffers on unified memory",
                    self.desc.name, self.desc.device_type
                ),
            ));
        }
        self.unified_slots.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Counts an expert slot fill (`mapped`: written in place, else through the queue).
    pub(crate) fn count_slot_fill(&self, mapped: bool) {
        bump(if mapped {
            &self.counts.slot_maps
        } else {
            &self.counts.slot_copies
        });
    }

    /// The cache key of kernel `name`'s pipeline and its kept bind groups: `name`, with
    /// `#lean` where [`Wgpu::lean_kernels`] makes it lean (and its name does not already).
    fn pipe_key<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        if self.lean_kernels() && !crate::shaders::lean(name) {
            format!("{name}#lean").into()
        } else {
            name.into()
        }
    }

    /// Submits what is recorded.
    pub(crate) fn flush(&self) -> Result<()> {
        let t = self.start();
        let mut g = self.pending()?;
        self.submit(&mut g);
        drop(g);
        self.add_ns(t);
        Ok(())
    }

    /// Records kernel `name` over `groups` workgroups with `params` (binding 0, a uniform of
    /// up to 16 words, in the batch's arena) and `bufs` at their binding numbers.
    pub(crate) fn dispatch(
        &self,
        name: &str,
        params: &[u32],
        bufs: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<()> {
        self.dispatch_with(name, params, bufs, groups, true)
    }

    /// [`Wgpu::dispatch`] whose bind group is not kept: for buffers made for one call (a
    /// layer's uploaded experts), which a kept bind group would hold alive.
    pub(crate) fn dispatch_once(
        &self,
        name: &str,
        params: &[u32],
        bufs: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
    ) -> Result<()> {
        self.dispatch_with(name, params, bufs, groups, false)
    }

    fn dispatch_with(
        &self,
        name: &str,
        params: &[u32],
        bufs: &[(u32, &wgpu::Buffer)],
        groups: [u32; 3],
        keep: bool,
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let lim = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > lim) {
            return Err(op_err(
                "dispatch",
                format!(
                    "{name}: grid {groups:?} exceeds the adapter's {lim} workgroups per dimension"
                ),
            ));
        }
        if params.len() > 16 {
            return Err(op_err(
                "dispatch",
                format!("{name}: {} parameter words", params.len()),
            ));
        }
        let t = self.start();
        let pipe = self.pipeline(name)?;
        let q = self.trace_take(name, false)?;
        let mut words = [0u32; 16];
        words[..params.len()].copy_from_slice(params);
        let mut g = self.pending()?;
        let slots = self.submit_batch() as u64;
        if g.used >= slots {
            // The arena is full (the batch was made smaller): submit what it holds.
            self.submit(&mut g);
        }
        let arena = match &g.arena {
            Some(a) if a.size() >= slots * self.stride => a.clone(),
            _ => {
                // None yet, or the batch was made larger: what the old arena holds goes first.
                self.submit(&mut g);
                bump(&self.counts.buffers);
                let a = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: slots * self.stride,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                g.arena = Some(a.clone());
                g.host = vec![0; (slots * self.stride) as usize];
                a
            }
        };
        let off = g.used * self.stride;
        g.used += 1;
        g.host[off as usize..(off + PARAMS) as usize].copy_from_slice(bytemuck::cast_slice(&words));
        bump(&self.counts.dispatches);
        let make = |bufs: &[(u32, wgpu::Buffer)]| {
            bump(&self.counts.bind_groups);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &arena,
                    offset: 0,
                    size: std::num::NonZeroU64::new(PARAMS),
                }),
            }];
            entries.extend(bufs.iter().map(|(b, buf)| wgpu::BindGroupEntry {
                binding: *b,
                resource: buf.as_entire_binding(),
            }));
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipe.get_bind_group_layout(0),
                entries: &entries,
            })
        };
        let owned: Vec<(u32, wgpu::Buffer)> = std::iter::once((0, arena.clone()))
            .chain(bufs.iter().map(|&(b, buf)| (b, buf.clone())))
            .collect();
        let bg = if keep {
            self.binds
                .lock()
                .map_err(|_| op_err("dispatch", "lock poisoned"))?
                .get(&self.pipe_key(name), owned, |o| make(&o[1..]))
                .0
        } else {
            make(&owned[1..])
        };
        let dyn_off = [off as u32];
        let run = |pass: &mut wgpu::ComputePass<'_>| {
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &dyn_off);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        };
        // One pass for consecutive dispatches (timestamps between them where the device
        // has them inside passes), else a pass per dispatch (timestamps at its ends).
        let shared = self.one_pass() && (q.is_none() || self.stamps.inside_pass);
        if shared {
            if g.pass.is_none() {
                let enc = self.encoder(&mut g);
                let p = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                g.pass = Some(p.forget_lifetime());
            }
            let pass = g
                .pass
                .as_mut()
                .ok_or_else(|| op_err("dispatch", "no pass"))?;
            match &q {
                Some((set, i)) => {
                    pass.write_timestamp(set, *i);
                    run(pass);
                    pass.write_timestamp(set, i + 1);
                }
                None => run(pass),
            }
        } else {
            let enc = self.encoder(&mut g);
            let tw = q.as_ref().map(|(set, i)| wgpu::ComputePassTimestampWrites {
                query_set: set,
                beginning_of_pass_write_index: Some(*i),
                end_of_pass_write_index: Some(i + 1),
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: tw,
            });
            run(&mut pass);
        }
        self.recorded(&mut g);
        drop(g);
        self.add_ns(t);
        Ok(())
    }

    /// Records a copy of `bytes` from `src` at `so` to `dst` at `d_o`.
    pub(crate) fn copy(
        &self,
        src: &wgpu::Buffer,
        so: u64,
        dst: &wgpu::Buffer,
        d_o: u64,
        bytes: u64,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.with_encoder(|enc| enc.copy_buffer_to_buffer(src, so, dst, d_o, bytes))
    }

    /// Records zeroing the first `bytes` of `buf` (a multiple of 4).
    pub(crate) fn clear(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.with_encoder_named("clear", |enc| enc.clear_buffer(buf, 0, Some(bytes)))
    }

    /// Waits for everything recorded and reads `bytes` of `src` from offset 0.
    pub(crate) fn read(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.next_multiple_of(4);
        bump(&self.counts.buffers);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.copy(src, 0, &staging, 0, size)?;
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| op_err("read", e.to_string()))?
            .map_err(|e| op_err("read", e.to_string()))?;
        let out = staging
            .get_mapped_range(..)
            .map_err(|e| op_err("read", format!("{e:?}")))?[..bytes as usize]
            .to_vec();
        staging.unmap();
        Ok(out)
    }

    /// Waits until the device has finished everything submitted.
    pub(crate) fn wait(&self) -> Result<()> {
        self.flush()?;
        bump(&self.counts.waits);
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| op_err("wait", e.to_string()))
    }
}

/// A 2D grid of at least `n` workgroups: `[x, y, 1]`, and x (the kernels' row stride).
pub(crate) fn grid(n: usize) -> ([u32; 3], u32) {
    let n = n as u32;
    let x = n.clamp(1, GRID_X);
    ([x, n.div_ceil(x), 1], x)
}

/// The fast products on a hardware adapter: lane groups of its subgroup size where that is
/// fixed and subgroup operations are on (else 32 lanes summing through workgroup memory), 256
/// threads per workgroup and two rows per lane group (each lane loads x once for the two).
/// Measured on the H100's Vulkan driver (4d4c7dc, GPU timestamps, every candidate of the
/// bench): two rows at 256 threads took 28 / 81 / 1022 us at 4096x4096 / 16384x4096 /
/// 248320x4096, four rows at 128 threads (the earlier default) 38 / 141 / 1087 us; two rows
/// were the fastest or within 1% of it at each shape in this and the two earlier runs.
/// `None` where the adapter cannot run a workgroup of 32.
fn default_fast(
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: &wgpu::Limits,
) -> Option<Fast> {
    let fixed = info.subgroup_min_size == info.subgroup_max_size;
    let sg = info.subgroup_max_size;
    let subgroup = features.contains(wgpu::Features::SUBGROUP)
        && fixed
        && sg.is_power_of_two()
        && (4..=128).contains(&sg);
    let lg = if subgroup { sg } else { 32 };
    let max = limits.max_compute_invocations_per_workgroup;
    let wgs = 128u32.min(max).max(lg);
    // The one-token decode form, lean, 8 rows per lane group of 32 at 128 threads: the
    // fastest of the candidates by GPU time on the H100's Vulkan driver (2026-12-07, 09f4580,
    // crates/wgpu/results/bench-wgpu-h100-2026-12-07-09f4580.json): 19.6 / 27.4 / 252 us at
    // 4096x4096 / 16384x4096 / 248320x4096 against the former default's (plain form, 2 rows,
    // 256 threads, loop bounding forced) 31.3 / 250.6 / 1024 us. Other adapters take the
    // same shape unmeasured. Prompts (t > 1) run the plain form at 4 rows
    // (`Fast::for_product`).
    let f = Fast {
        lg,
        wgs,
        r: 8,
        subgroup,
        form: Form::Decode { span: 1 },
        lean: true,
    };
    (wgs <= max && f.valid()).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sg: u32) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            subgroup_min_size: sg,
            subgroup_max_size: sg,
            ..wgpu::AdapterInfo::new(wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan)
        }
    }

    /// The default fast products are a configuration the kernels accept, with subgroup sums
    /// only at a fixed power-of-two size, on adapters of 32 and 64 lanes and without subgroups.
    #[test]
    fn default_fast_is_valid_on_every_kind_of_adapter() {
        let limits = wgpu::Limits::default();
        for (sg, feat) in [
            (32, wgpu::Features::SUBGROUP),
            (64, wgpu::Features::SUBGROUP),
            (32, wgpu::Features::empty()),
        ] {
            let f = default_fast(&info(sg), feat, &limits).expect("a default");
            assert!(f.valid(), "{f:?}");
            assert_eq!(f.subgroup, !feat.is_empty(), "{f:?}");
            assert_eq!(f.lg, sg, "{f:?}");
            assert!(
                f.lean && matches!(f.form, Form::Decode { span: 1 }),
                "{f:?}"
            );
        }
    }
}
