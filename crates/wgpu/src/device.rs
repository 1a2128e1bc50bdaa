//! The device side: adapter listing and choice, buffers, the kernel pipelines (compiled on
//! first use), dispatch into one pending command encoder, and read-back.
//!
//! Every buffer the ops write is created with its contents (`create_buffer_init`) or zeroed,
//! never written with `queue.write_buffer`: such a write lands before the pending encoder's
//! commands when they are submitted, so batching dispatches in one encoder is safe only
//! without it.
use std::collections::HashMap;
use std::sync::Mutex;

use flashmoe_core::error::Result;
use flashmoe_core::residency::Residency;
use wgpu::util::DeviceExt;

use crate::shaders::Fast;
use crate::{op_err, WgpuError};

/// Commands recorded before the pending encoder is submitted, by default: on a GPU a short
/// batch lets the device start while the host records the rest of a token (the bench measures
/// others, `Wgpu::set_submit_batch`); a software adapter runs a submission on the host's threads.
const BATCH_GPU: usize = 32;
const BATCH_SOFTWARE: usize = 256;
/// Bytes of one dispatch's parameters (16 words).
const PARAMS: u64 = 64;

/// What is recorded and not yet submitted: the encoder, its command count, and the uniform
/// parameters of its dispatches, written into one buffer while it is mapped (unmapped at
/// submission) instead of a buffer per dispatch.
#[derive(Default)]
struct Pending {
    enc: Option<wgpu::CommandEncoder>,
    n: usize,
    arena: Option<wgpu::Buffer>,
    used: u64,
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
    /// waits for it (serial). The bench measures both.
    overlap: std::sync::atomic::AtomicBool,
    /// Bound where a kernel declares a buffer that an op does not use.
    pub(crate) dummy: wgpu::Buffer,
    /// The product kernels (see [`Products`]).
    pub(crate) products: Products,
    default_fast: Option<Fast>,
    /// The routed experts' residency tier, when one is enabled (`slots.rs`).
    pub(crate) tier: Mutex<Option<Residency<Wgpu>>>,
    /// Buffers of dropped `GBuf`s, for the next allocation of their size.
    pub(crate) pool: std::sync::Arc<crate::pool::Pool>,
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
        // Subgroup operations where the adapter has them (the fast products' reduction).
        let features = adapter.features() & wgpu::Features::SUBGROUP;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("flashmoe"),
            required_limits: limits.clone(),
            required_features: features,
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
            products,
            default_fast,
            tier: Mutex::new(None),
            pool: Default::default(),
            device,
            queue,
            desc,
            limits,
            pipes: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            batch: batch.into(),
            stride,
            overlap: true.into(),
            dummy,
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

    /// The largest buffer one binding may cover, in bytes.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// A zeroed buffer of `bytes` (at least 16, a multiple of 4).
    pub(crate) fn buffer(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(16).next_multiple_of(4),
            usage: USAGE,
            mapped_at_creation: false,
        })
    }

    /// A buffer holding `data` (padded with zeros to 16 bytes and a multiple of 4).
    pub(crate) fn buffer_with(&self, data: &[u8]) -> wgpu::Buffer {
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
        let mut p = self
            .pipes
            .lock()
            .map_err(|_| op_err("pipeline", "lock poisoned"))?;
        if let Some(x) = p.get(name) {
            return Ok(x.clone());
        }
        let (src, entry) = crate::shaders::source(name)
            .ok_or_else(|| op_err("pipeline", format!("no kernel named {name}")))?;
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let pipe = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        p.insert(name.to_string(), pipe.clone());
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

    /// Submits `g`'s commands (the arena unmapped first).
    fn submit(&self, g: &mut Pending) {
        if let Some(a) = g.arena.take() {
            a.unmap();
        }
        if let Some(e) = g.enc.take() {
            self.queue.submit([e.finish()]);
        }
        g.n = 0;
        g.used = 0;
    }

    /// Records `f` into the pending encoder; submits when the batch is full.
    fn record(&self, g: &mut Pending, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let enc = g.enc.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        f(enc);
        g.n += 1;
        if g.n >= self.submit_batch() {
            self.submit(g);
        }
    }

    fn with_encoder(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let mut g = self.pending()?;
        self.record(&mut g, f);
        Ok(())
    }

    /// Submits what is recorded.
    pub(crate) fn flush(&self) -> Result<()> {
        let mut g = self.pending()?;
        self.submit(&mut g);
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
        let pipe = self.pipeline(name)?;
        let mut words = [0u32; 16];
        words[..params.len()].copy_from_slice(params);
        let mut g = self.pending()?;
        let slots = self.submit_batch() as u64;
        let arena = match &g.arena {
            Some(a) if g.used < slots => a.clone(),
            _ => {
                // A full arena (the batch was changed): submit and start another.
                if g.arena.is_some() {
                    self.submit(&mut g);
                }
                let a = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("params"),
                    size: slots * self.stride,
                    usage: wgpu::BufferUsages::UNIFORM,
                    mapped_at_creation: true,
                });
                g.arena = Some(a.clone());
                g.used = 0;
                a
            }
        };
        let off = g.used * self.stride;
        g.used += 1;
        arena
            .get_mapped_range_mut(off..off + PARAMS)
            .map_err(|e| op_err("dispatch", format!("{name}: parameters: {e:?}")))?
            .copy_from_slice(bytemuck::cast_slice(&words));
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &arena,
                offset: off,
                size: std::num::NonZeroU64::new(PARAMS),
            }),
        }];
        entries.extend(bufs.iter().map(|(b, buf)| wgpu::BindGroupEntry {
            binding: *b,
            resource: buf.as_entire_binding(),
        }));
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &entries,
        });
        self.record(&mut g, |enc| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        });
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
        self.with_encoder(|enc| enc.clear_buffer(buf, 0, Some(bytes)))
    }

    /// Waits for everything recorded and reads `bytes` of `src` from offset 0.
    pub(crate) fn read(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.next_multiple_of(4);
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
/// fixed and subgroup operations are on (else 32 lanes summing through workgroup memory), 128
/// threads per workgroup and four rows per lane group (each lane loads x once for the four,
/// and has four rows' loads in flight: CUDA's float matvec on the H100 of round 1 was fastest
/// at four rows per warp, 0.64 of its copy rate on the 248320-row head against 0.49 at one).
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
    let wgs = 128u32.max(lg);
    let f = Fast {
        lg,
        wgs,
        r: 4,
        subgroup,
    };
    (wgs <= max).then_some(f)
}
