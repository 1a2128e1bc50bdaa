//! Bind groups made once per (kernel, parameter arena, buffers) and kept: a decode token
//! dispatches the same kernels over the same weights and pooled activations every token, and
//! creating a bind group per dispatch was host work that grew with the dispatches. For that,
//! each kernel gets an explicit layout (the bindings its entry point uses, as wgpu's automatic
//! layout has them, read from the WGSL with naga) whose parameters (binding 0) sit at a
//! dynamic offset in the arena, so the offset of a dispatch's parameters is no part of its
//! bind group.
use std::collections::HashMap;

use flashmoe_core::error::Result;

use crate::op_err;

/// Bind groups kept at most; past it, those unused for the last `KEEP / 2` dispatches go.
/// Every `KEEP` dispatches those unused for the last `KEEP` go too: a kept bind group holds
/// its buffers alive (a KV cache that grew, a dropped buffer the pool did not keep).
const KEEP: usize = 8192;

/// The layout of kernel `name`'s entry point `entry` in `src`: binding 0 a uniform at a
/// dynamic offset, the others storage buffers, read-only where the shader declares them so.
pub(crate) fn layout(
    device: &wgpu::Device,
    name: &str,
    src: &str,
    entry: &str,
) -> Result<wgpu::BindGroupLayout> {
    let err = |m: String| op_err("pipeline", format!("{name}: {m}"));
    let module = naga::front::wgsl::parse_str(src).map_err(|e| err(e.emit_to_string(src)))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| err(format!("{e:?}")))?;
    let ep = module
        .entry_points
        .iter()
        .position(|e| e.name == entry)
        .ok_or_else(|| err(format!("no entry point {entry}")))?;
    let uses = info.get_entry_point(ep);
    let mut entries = Vec::new();
    for (h, var) in module.global_variables.iter() {
        let Some(rb) = &var.binding else { continue };
        if uses[h].is_empty() {
            continue;
        }
        if rb.group != 0 {
            return Err(err(format!("binding in group {}", rb.group)));
        }
        let ty = match var.space {
            naga::AddressSpace::Uniform => wgpu::BufferBindingType::Uniform,
            naga::AddressSpace::Storage { access } => wgpu::BufferBindingType::Storage {
                read_only: !access.contains(naga::StorageAccess::STORE),
            },
            other => return Err(err(format!("binding {} in {other:?}", rb.binding))),
        };
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: rb.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: rb.binding == 0,
                min_binding_size: None,
            },
            count: None,
        });
    }
    Ok(
        device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        }),
    )
}

type Key = (String, Vec<(u32, wgpu::Buffer)>);

/// The kept bind groups, each with the dispatch count at its last use.
#[derive(Default)]
pub(crate) struct Cache {
    map: HashMap<Key, (wgpu::BindGroup, u64)>,
    tick: u64,
}

impl Cache {
    /// The bind group of `name` over `bufs` (binding 0 the arena), made by `make` when not
    /// kept; `true` with it when it was made.
    pub fn get(
        &mut self,
        name: &str,
        bufs: Vec<(u32, wgpu::Buffer)>,
        make: impl FnOnce(&[(u32, wgpu::Buffer)]) -> wgpu::BindGroup,
    ) -> (wgpu::BindGroup, bool) {
        self.tick += 1;
        if self.tick.is_multiple_of(KEEP as u64) {
            let old = self.tick - KEEP as u64;
            self.map.retain(|_, (_, t)| *t > old);
        }
        let key = (name.to_string(), bufs);
        if let Some((bg, t)) = self.map.get_mut(&key) {
            *t = self.tick;
            return (bg.clone(), false);
        }
        if self.map.len() >= KEEP {
            let old = self.tick.saturating_sub(KEEP as u64 / 2);
            self.map.retain(|_, (_, t)| *t >= old);
        }
        let bg = make(&key.1);
        self.map.insert(key, (bg.clone(), self.tick));
        (bg, true)
    }
}
