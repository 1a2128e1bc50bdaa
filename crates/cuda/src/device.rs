//! The CUDA device: driver context, two streams (compute, copy), raw device and pinned host
//! buffers, events, and the kernel module (CUDA C++ in `kernels.cu`, compiled by NVRTC for the
//! device's architecture at first use and cached as PTX under `~/.cache/flashmoe`).
//!
//! Owns every `unsafe` call into the driver. Never knows about models; `ops.rs` and the backend
//! (backend/) build on the safe wrappers here.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdeviceptr, CUevent, CUevent_flags, CUstream};
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream, LaunchConfig};

use crate::kernel::Kernel;
use crate::{CudaError, Result};

const KERNELS: &str = include_str!("kernels.cu");

fn drv(what: &str, e: result::DriverError) -> CudaError {
    CudaError::Driver {
        what: what.to_string(),
        msg: format!("{e:?}"),
    }
}

/// A device allocation, freed on drop. Plain bytes: kernels see it as a typed pointer.
pub struct DBuf {
    ptr: CUdeviceptr,
    len: usize,
}

// SAFETY: a device pointer is an integer handle valid in every thread of the process that binds
// the same context; the buffer is freed once, on drop.
unsafe impl Send for DBuf {}
// SAFETY: shared access only reads the handle.
unsafe impl Sync for DBuf {}

impl DBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `len` bytes of device memory in the context current on this thread (empty for 0).
fn malloc(len: usize) -> Result<DBuf> {
    if len == 0 {
        return Ok(DBuf { ptr: 0, len: 0 });
    }
    // SAFETY: plain allocation; freed by DBuf's drop.
    let ptr = unsafe { result::malloc_sync(len) }.map_err(|e| CudaError::Alloc {
        bytes: len,
        msg: format!("{e:?}"),
    })?;
    Ok(DBuf { ptr, len })
}

impl Drop for DBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr came from malloc_sync and is freed exactly once; freeing synchronises
            // with outstanding work that uses it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (for DMA copies that overlap compute), freed on drop.
pub struct Pinned {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned allocation, like a Vec<u8>.
unsafe impl Send for Pinned {}
// SAFETY: shared access hands out only &[u8].
unsafe impl Sync for Pinned {}

impl Pinned {
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; &mut self gives exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated by malloc_host, freed once.
            let _ = unsafe { result::free_host(self.ptr as *mut _) };
        }
    }
}

/// A CUDA event (timing enabled), destroyed on drop.
pub struct Event(CUevent);

// SAFETY: event handles may be used from any thread bound to the context.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by event::create, destroyed once.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// Kernel parameter block of up to [`MAXP`] matrix-vector problems (mirrors `MvBatch` in
/// kernels.cu; passed by value).
pub const MAXP: usize = 16;
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct MvBatch {
    pub w: [u64; MAXP],
    pub s: [u64; MAXP],
    pub b: [u64; MAXP],
    pub x: [u64; MAXP],
    pub y: [u64; MAXP],
}

/// Parameters of `router_experts` (mirrors `ExpertBatchArgs` in kernels.cu; passed by value):
/// the layer's slot table, offsets inside a slot of gate‖up w, s, b and down w, s, b, the
/// shared expert's six pointers (all 0 when it is not batched with the routed ones), and the
/// activation buffers the problems read and write.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ExpertBatchArgs {
    pub tbl: u64,
    pub off: [i64; 6],
    pub sh: [u64; 6],
    pub xn: u64,
    pub gue: u64,
    pub he: u64,
    pub ye: u64,
    pub i: i32,
    pub h: i32,
}

/// What an `mpc` / `mpa` matvec does besides writing its outputs (mirrors `Epi` in
/// kernels.cu, passed by value): the GatedDeltaNet conv of rows < cd (state, weights, output,
/// kernel size) or the argmax key.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Epi {
    pub state: u64,
    pub w: u64,
    pub u: u64,
    pub cd: i32,
    pub k: i32,
    pub key: u64,
}

// The layouts kernels.cu asserts for the same structs (static_assert there): a field added on
// one side only fails both builds instead of shifting every argument after it.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<MvBatch>() == 5 * MAXP * 8 && offset_of!(MvBatch, y) == 4 * MAXP * 8);
    assert!(size_of::<Epi>() == 40 && offset_of!(Epi, cd) == 24 && offset_of!(Epi, key) == 32);
    assert!(size_of::<ExpertBatchArgs>() == 144 && offset_of!(ExpertBatchArgs, sh) == 56);
    assert!(offset_of!(ExpertBatchArgs, xn) == 104 && offset_of!(ExpertBatchArgs, i) == 136);
};

pub struct Device {
    /// Scratch for x prepared by `quant_x3_*` for the `mp` matvec kernels, used on the
    /// compute stream only ([`crate::ops::QX_SCRATCH`] bytes). Declared before `ctx` so that it
    /// is freed while the context is alive.
    pub qx: DBuf,
    /// Three more prepared-x slots ([`crate::ops::QX_SLOT`] bytes each) for x prepared by its
    /// producer (norms) and read by later launches, so they never meet `qx`'s uses.
    qxp: DBuf,
    /// Four bytes that [`Device::fence`] clears.
    fence: DBuf,
    pub ctx: Arc<CudaContext>,
    /// Kernels run here, in order.
    pub compute: Arc<CudaStream>,
    /// Host-to-device expert copies, overlapping `compute`.
    pub copy: Arc<CudaStream>,
    /// The kernels at [`Kernel::index`] (loaded in [`Kernel::all`] order).
    funcs: Vec<CudaFunction>,
    pub name: String,
    pub arch: (i32, i32),
    pub sms: i32,
    /// When on (`trace_start`), an event after every compute-stream launch: the bench's
    /// per-kernel breakdown of one token. Off in normal runs.
    trace: Mutex<Option<Vec<Traced>>>,
    /// Whether `trace` is on: read first by every launch, so an untraced launch takes no lock.
    tracing: AtomicBool,
    /// Weight bytes the next launch reads, noted by the matvec wrappers for the trace.
    pending_bytes: AtomicUsize,
}

/// Most arguments a kernel takes (`launch_on` keeps their addresses in an array of this size
/// on the stack; a longer list is refused).
pub const MAX_ARGS: usize = 20;

/// One traced launch: kernel, grid, weight bytes read, and the event recorded after it.
struct Traced(Kernel, (u32, u32, u32), usize, Event);

/// Per-kernel time of a traced stretch of work (each launch serialised behind an event, so
/// the times include each launch's own latency and none of the dependent-launch overlap).
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub launches: usize,
    pub total_us: f64,
    /// Weight bytes the launches read (matvecs; 0 for the rest).
    pub bytes: usize,
}

fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("FLASHMOE_CACHE") {
        return PathBuf::from(x);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("flashmoe")
}

/// FNV-1a: a stable hash for the PTX cache key (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Every kernel [`Device::new`] loads from the compiled module, by name ([`Kernel::all`]).
pub fn kernel_names() -> Vec<String> {
    Kernel::all().map(Kernel::name).collect()
}

impl Device {
    /// Opens device `ordinal`: loads the driver, creates the context and streams, compiles (or
    /// reads from the cache) the kernels. Fails with `CudaError::NoDevice` when there is no
    /// driver or no GPU.
    pub fn new(ordinal: usize) -> Result<Device> {
        // SAFETY: only probes whether libcuda can be dlopen'ed.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        if !present {
            return Err(CudaError::NoDevice(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        // cudarc panics inside when a symbol is missing; turn that into an error too.
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| CudaError::NoDevice("the CUDA driver could not be initialised".into()))?
            .map_err(|e| CudaError::NoDevice(format!("device {ordinal}: {e:?}")))?;
        // We order work between our two streams with explicit events; cudarc's per-buffer
        // tracking would add events to every launch.
        // SAFETY: called before any CudaSlice exists in this context (we use none).
        unsafe { ctx.disable_event_tracking() };
        let compute = ctx.new_stream().map_err(|e| drv("stream", e))?;
        let copy = ctx.new_stream().map_err(|e| drv("stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let arch = ctx
            .compute_capability()
            .map_err(|e| drv("compute capability", e))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(1);
        let ptx = Self::ptx_for(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| drv("load PTX module", e))?;
        let mut funcs = Vec::with_capacity(Kernel::COUNT);
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .unwrap_or(0)
            .max(0) as usize;
        for k in Kernel::all() {
            let n = k.name();
            let f = module
                .load_function(&n)
                .map_err(|e| drv(&format!("kernel {n}"), e))?;
            crate::gemm::opt_in(k, &f, optin)?;
            debug_assert_eq!(funcs.len(), k.index());
            funcs.push(f);
        }
        let qx = malloc(crate::ops::QX_SCRATCH)?;
        let qxp = malloc(3 * crate::ops::QX_SLOT)?;
        let fence = malloc(4)?;
        Ok(Device {
            qx,
            qxp,
            fence,
            ctx,
            compute,
            copy,
            funcs,
            name,
            arch,
            sms,
            trace: Mutex::new(None),
            tracing: AtomicBool::new(false),
            pending_bytes: AtomicUsize::new(0),
        })
    }

    /// The kernels' PTX for compute capability `arch` (compiled by NVRTC, or from the cache).
    /// Needs NVRTC but no GPU, so kernel sources can be checked on a machine without one.
    pub fn ptx_for(arch: (i32, i32)) -> Result<String> {
        let arch_s = format!("sm_{}{}", arch.0, arch.1);
        let key = fnv1a(format!("{arch_s}\n{KERNELS}").as_bytes());
        let path = cache_dir().join(format!("kernels-{arch_s}-{key:016x}.ptx"));
        if let Ok(s) = std::fs::read_to_string(&path) {
            return Ok(s);
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(Box::leak(arch_s.clone().into_boxed_str())),
            options: vec!["-std=c++17".into()],
            ..Default::default()
        };
        let ptx = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts))
            .map_err(|_| CudaError::NoDevice("NVRTC (libnvrtc) could not be loaded".into()))?
            .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
        let src = ptx.to_src();
        if std::fs::create_dir_all(cache_dir()).is_ok() {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, &src).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        Ok(src)
    }

    /// Prepared-x slot `i` (< 3), compute stream only.
    pub fn qx_slot(&self, i: usize) -> u64 {
        assert!(i < 3, "prepared-x slot {i}");
        self.qxp.ptr() + (i * crate::ops::QX_SLOT) as u64
    }

    /// Makes this device's context current on the calling thread (every public entry does).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| drv("bind context", e))
    }

    /// The loaded function of kernel `k`.
    pub fn func(&self, k: Kernel) -> Result<&CudaFunction> {
        self.funcs
            .get(k.index())
            .ok_or_else(|| CudaError::Invalid(format!("kernel {k} was not loaded")))
    }

    pub fn alloc(&self, len: usize) -> Result<DBuf> {
        malloc(len)
    }

    pub fn alloc_zeros(&self, len: usize) -> Result<DBuf> {
        let b = self.alloc(len)?;
        if len > 0 {
            // SAFETY: b is a live allocation of len bytes.
            unsafe { result::memset_d8_sync(b.ptr, 0, len) }.map_err(|e| drv("memset", e))?;
        }
        Ok(b)
    }

    /// A device copy of `data` (synchronous).
    pub fn upload(&self, data: &[u8]) -> Result<DBuf> {
        let b = self.alloc(data.len())?;
        if !data.is_empty() {
            // SAFETY: b has data.len() bytes; the copy completes before returning.
            unsafe { result::memcpy_htod_sync(b.ptr, data) }.map_err(|e| drv("upload", e))?;
        }
        Ok(b)
    }

    pub fn upload_f32(&self, v: &[f32]) -> Result<DBuf> {
        self.upload(bytemuck::cast_slice(v))
    }

    /// Writes `data` at `dst` (synchronous, after the compute stream's earlier work).
    pub fn write(&self, dst: u64, data: &[u8]) -> Result<()> {
        self.sync()?;
        // SAFETY: caller passes a pointer into a live allocation with room for data.
        unsafe { result::memcpy_htod_sync(dst, data) }.map_err(|e| drv("write", e))
    }

    /// Writes `data` at `dst` in order on the compute stream (from pageable memory: the driver
    /// stages it before returning, so `data` may be dropped at once).
    pub fn write_async(&self, dst: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: dst points into a live allocation with room for data (callers' contract);
        // a pageable source is copied into staging before the call returns.
        unsafe { result::memcpy_htod_async(dst, data, self.compute.cu_stream()) }
            .map_err(|e| drv("write", e))
    }

    /// Reads `out.len()` f32 from `src` after the compute stream's earlier work.
    pub fn read_f32(&self, src: u64, out: &mut [f32]) -> Result<()> {
        self.sync()?;
        // SAFETY: caller passes a pointer into a live allocation of at least out.len() floats.
        unsafe { result::memcpy_dtoh_sync(out, src) }.map_err(|e| drv("read", e))
    }

    pub fn pinned(&self, len: usize) -> Result<Pinned> {
        if len == 0 {
            return Ok(Pinned {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: page-locked allocation, freed by Pinned's drop.
        let p = unsafe { result::malloc_host(len, 0) }.map_err(|e| CudaError::Alloc {
            bytes: len,
            msg: format!("pinned: {e:?}"),
        })?;
        Ok(Pinned {
            ptr: p as *mut u8,
            len,
        })
    }

    /// Async host-to-device copy on `stream` from pinned memory.
    pub fn htod_async(
        &self,
        dst: u64,
        src: &Pinned,
        off: usize,
        len: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        assert!(off + len <= src.len, "htod_async: source range");
        // SAFETY: src is pinned and outlives the copy (callers synchronise before reuse); dst
        // points into a live allocation with room for len bytes.
        unsafe {
            result::memcpy_htod_async(dst, &src.as_slice()[off..off + len], stream.cu_stream())
        }
        .map_err(|e| drv("htod", e))
    }

    /// Async host-to-device copy of `src`, which must be pinned memory (e.g. a slice of a
    /// [`Pinned`]) that stays alive and unmodified until the copy completes.
    pub fn htod_async_bytes(&self, dst: u64, src: &[u8], stream: &CudaStream) -> Result<()> {
        // SAFETY: dst points into a live allocation with room for src.len() bytes; the caller
        // keeps src alive and unmodified until `stream` passes this copy (see above).
        unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }
            .map_err(|e| drv("htod", e))
    }

    /// Async device-to-host copy of `len` bytes into pinned memory.
    pub fn dtoh_async(
        &self,
        dst: &Pinned,
        src: u64,
        len: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        assert!(len <= dst.len, "dtoh_async: destination range");
        // SAFETY: the DMA engine writes dst's first len bytes; callers read them (through
        // `as_slice`) only after synchronising on the stream, and no Rust reference to the range
        // is alive across the copy. src is a live device range.
        unsafe {
            let out = std::slice::from_raw_parts_mut(dst.ptr, len);
            result::memcpy_dtoh_async(out, src, stream.cu_stream())
        }
        .map_err(|e| drv("dtoh", e))
    }

    /// Zeroes `len` bytes at `dst`, in order on the compute stream.
    pub fn memset_async(&self, dst: u64, len: usize) -> Result<()> {
        // SAFETY: dst is a live device range of at least len bytes (callers' contract).
        unsafe { result::memset_d8_async(dst, 0, len, self.compute.cu_stream()) }
            .map_err(|e| drv("memset", e))
    }

    /// Ends the dependent-launch overlap between the kernels launched before and after it
    /// on the compute stream (a memset is not a kernel, so the next launch starts only after
    /// the previous kernel is complete): for a kernel that reads, before its `pdl_wait`, what
    /// the kernel launched just before it writes (gdn_step's state, launched token after token).
    pub fn fence(&self) -> Result<()> {
        self.memset_async(self.fence.ptr(), 4)
    }

    pub fn dtod_async(&self, dst: u64, src: u64, len: usize, stream: &CudaStream) -> Result<()> {
        // SAFETY: both ranges are live device allocations of at least len bytes.
        unsafe { result::memcpy_dtod_async(dst, src, len, stream.cu_stream()) }
            .map_err(|e| drv("dtod", e))
    }

    pub fn event(&self) -> Result<Event> {
        let e =
            result::event::create(CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| drv("event", e))?;
        Ok(Event(e))
    }

    pub fn record(&self, ev: &Event, stream: &CudaStream) -> Result<()> {
        // SAFETY: both handles are live.
        unsafe { result::event::record(ev.0, stream.cu_stream()) }
            .map_err(|e| drv("event record", e))
    }

    /// Makes `stream` wait for `ev` (device-side, no host block).
    pub fn wait(&self, stream: &CudaStream, ev: &Event) -> Result<()> {
        // SAFETY: both handles are live.
        unsafe {
            result::stream::wait_event(
                stream.cu_stream() as CUstream,
                ev.0,
                cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| drv("stream wait", e))
    }

    pub fn event_sync(&self, ev: &Event) -> Result<()> {
        // SAFETY: live handle.
        unsafe { result::event::synchronize(ev.0) }.map_err(|e| drv("event sync", e))
    }

    /// Milliseconds between two completed events.
    pub fn elapsed_ms(&self, a: &Event, b: &Event) -> Result<f32> {
        // SAFETY: live handles, both recorded and complete.
        unsafe { result::event::elapsed(a.0, b.0) }.map_err(|e| drv("event elapsed", e))
    }

    pub fn sync(&self) -> Result<()> {
        self.compute
            .synchronize()
            .map_err(|e| drv("synchronize", e))
    }

    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| drv("mem info", e))
    }

    /// Launches kernel `k` on `stream` with `args` in order. On the compute stream of a
    /// Hopper or later device it is a programmatic dependent launch: its blocks may start while
    /// the previous kernel runs, once that kernel's blocks have executed
    /// `griddepcontrol.launch_dependents`, and every kernel executes `griddepcontrol.wait`
    /// before touching anything its predecessor reads or writes (`pdl_wait` in kernels.cu).
    ///
    /// Allocates nothing and takes no lock unless tracing (the token path launches about a
    /// hundred kernels, each a few microseconds of host work at most).
    pub fn launch_on(
        &self,
        stream: &CudaStream,
        k: Kernel,
        cfg: LaunchConfig,
        args: &[A<'_>],
    ) -> Result<()> {
        use cudarc::driver::sys;
        let f = self.func(k)?;
        let mut params = params(k, args)?;
        let compute = std::ptr::eq(stream, &*self.compute);
        let dependent = self.arch.0 >= 9 && compute;
        // SAFETY: a zeroed attribute is a valid plain-data value; id and value are set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let lc = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: dependent as u32,
        };
        // SAFETY: every kernel's argument list is built by the typed wrappers in ops.rs to
        // match its signature in kernels.cu, and every pointer passed is a live allocation
        // sized for the launch; `params` points into `args` (and what its variants borrow),
        // which outlive the call (the driver copies the values at launch); the function
        // belongs to this device's context.
        unsafe {
            sys::cuLaunchKernelEx(
                &lc,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| drv(&format!("launch {k}"), e))?;
        if compute && self.tracing.load(Ordering::Relaxed) {
            let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = self.pending_bytes.swap(0, Ordering::Relaxed);
            if let Some(v) = t.as_mut() {
                let ev = self.event()?;
                self.record(&ev, stream)?;
                v.push(Traced(k, cfg.grid_dim, bytes, ev));
            }
        }
        Ok(())
    }

    /// Starts tracing compute-stream launches; returns the start event.
    pub fn trace_start(&self) -> Result<Event> {
        let ev = self.event()?;
        self.record(&ev, &self.compute)?;
        *self.trace.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        self.pending_bytes.store(0, Ordering::Relaxed);
        self.tracing.store(true, Ordering::Relaxed);
        Ok(ev)
    }

    /// Whether compute-stream launches are being traced.
    pub fn tracing(&self) -> bool {
        self.tracing.load(Ordering::Relaxed)
    }

    /// Notes the weight bytes the next compute-stream launch reads (for the trace; nothing
    /// when not tracing).
    pub fn note_bytes(&self, n: usize) {
        if self.tracing() {
            self.pending_bytes.store(n, Ordering::Relaxed);
        }
    }

    /// The kernels `f` launches on the compute stream, one name per launch (traced; tests
    /// check which kernels an op takes).
    pub fn launched_by(&self, f: impl FnOnce()) -> Result<Vec<String>> {
        let start = self.trace_start()?;
        f();
        let (k, _) = self.trace_finish(&start)?;
        Ok(k.iter()
            .flat_map(|k| std::iter::repeat_n(k.kernel.clone(), k.launches))
            .collect())
    }

    /// Stops tracing, waits for the traced work and sums the time between consecutive events
    /// per (kernel, grid), longest first; also each launch's weight bytes, in launch order.
    pub fn trace_finish(&self, start: &Event) -> Result<(Vec<KernelTime>, Vec<usize>)> {
        self.tracing.store(false, Ordering::Relaxed);
        let v = self
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        self.sync()?;
        let mut out: Vec<KernelTime> = Vec::new();
        let mut prev = start;
        for Traced(k, grid, bytes, ev) in &v {
            let us = self.elapsed_ms(prev, ev)? as f64 * 1e3;
            prev = ev;
            let name = k.name();
            match out.iter_mut().find(|t| t.kernel == name && t.grid == *grid) {
                Some(t) => {
                    t.launches += 1;
                    t.total_us += us;
                    t.bytes += bytes;
                }
                None => out.push(KernelTime {
                    kernel: name,
                    grid: *grid,
                    launches: 1,
                    total_us: us,
                    bytes: *bytes,
                }),
            }
        }
        out.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        Ok((out, v.iter().map(|t| t.2).collect()))
    }

    pub fn launch(&self, k: Kernel, cfg: LaunchConfig, args: &[A<'_>]) -> Result<()> {
        self.launch_on(&self.compute, k, cfg, args)
    }
}

/// The driver's parameter array for kernel `k`'s `args`: the address of each (valid while
/// `args` is borrowed), on the stack; more than [`MAX_ARGS`] is an error.
pub(crate) fn params(k: Kernel, args: &[A<'_>]) -> Result<[*mut std::ffi::c_void; MAX_ARGS]> {
    if args.len() > MAX_ARGS {
        return Err(CudaError::Invalid(format!(
            "kernel {k} launched with {} arguments, more than {MAX_ARGS}",
            args.len()
        )));
    }
    let mut p = [std::ptr::null_mut(); MAX_ARGS];
    for (p, a) in p.iter_mut().zip(args) {
        *p = a.addr();
    }
    Ok(p)
}

/// One kernel argument, by value (the structs by reference to the caller's value: the
/// driver copies them at launch, so nothing is boxed per launch).
#[derive(Clone, Copy)]
pub enum A<'a> {
    /// A device pointer (0 for a null pointer).
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    D(f64),
    B(&'a MvBatch),
    E(&'a ExpertBatchArgs),
    X(&'a Epi),
    /// The tensor-core GEMM's products (gemm.rs).
    G(&'a crate::gemm::GemmBatch),
}

impl A<'_> {
    /// The address of the value, as the driver's parameter array takes it (valid while `self`
    /// is borrowed).
    fn addr(&self) -> *mut std::ffi::c_void {
        use std::ffi::c_void;
        match self {
            A::P(v) => v as *const u64 as *mut c_void,
            A::I(v) => v as *const i32 as *mut c_void,
            A::L(v) => v as *const i64 as *mut c_void,
            A::F(v) => v as *const f32 as *mut c_void,
            A::D(v) => v as *const f64 as *mut c_void,
            A::B(v) => *v as *const MvBatch as *mut c_void,
            A::E(v) => *v as *const ExpertBatchArgs as *mut c_void,
            A::X(v) => *v as *const Epi as *mut c_void,
            A::G(v) => *v as *const crate::gemm::GemmBatch as *mut c_void,
        }
    }
}
