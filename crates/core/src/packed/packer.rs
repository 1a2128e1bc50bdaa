//! The packer as a plan and units of work, so that a checkpoint can be packed in any order its
//! tensors become available (a download delivers shard after shard) and the result is still
//! byte for byte what packing the whole directory at once writes.
//!
//! [`PackPlan::new`] decides everything from the checkpoint's headers alone (formats, every
//! dense tensor's offset in `dense.bin`, the expert layout): its source may be shard files whose
//! data has not arrived yet (sparse files holding only the safetensors header), since nothing
//! it looks at reads tensor bytes. [`Packer::run`] then writes one [`Unit`] (a dense tensor with
//! its scales and biases, or one MoE layer's experts) once every shard it reads is complete, and
//! [`Packer::finish`] builds the manifest when all units are done. Units can be recorded as
//! done by an earlier, interrupted run ([`Packer::mark_done`]): their bytes are already in place.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::{ExpertSource, StoreExperts};
use crate::model::Model;
use crate::store::{DType, SourceLayout, TensorStore};
use crate::weights::Linear;

use super::pack::{
    default_dense_bits, encode_expert, is_expert_tensor, plan_dense, run_dense, DenseJob,
    PackOptions, PackReport,
};
use super::writer::{copy_text_files, DenseLayout, DenseWriter, LayerWriter, Progress};
use super::{
    packed_err, strip_quantization, ExpertLayout, LayerFile, Manifest, FORMAT, FORMAT_VERSION,
};

/// One piece of packing work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// The n-th dense job (tensors in name order).
    Dense(usize),
    /// All experts of this MoE layer.
    Layer(usize),
}

/// A unit and what it needs.
#[derive(Clone, Debug)]
pub struct UnitInfo {
    pub unit: Unit,
    /// The source files (as the store names them) holding its tensors.
    pub files: BTreeSet<String>,
    /// Source bytes it reads (for progress).
    pub bytes: u64,
}

/// What a finished unit leaves for the manifest and the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UnitDone {
    /// The layer file's table (a layer unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerFile>,
    pub copied: usize,
    pub converted: usize,
}

/// Every decision of a pack, made before anything is written.
pub struct PackPlan {
    store: TensorStore,
    cfg: ModelConfig,
    raw: Value,
    experts: StoreExperts,
    kind: &'static str,
    bits: u32,
    group: usize,
    src_bits: Option<u32>,
    src_group: Option<usize>,
    dense_bits: Option<u32>,
    layout: ExpertLayout,
    moe_layers: Vec<usize>,
    dense_layout: DenseLayout,
    dense_jobs: Vec<DenseJob>,
}

impl PackPlan {
    /// Reads `src/config.json` and the checkpoint's headers, checks them as loading does, and
    /// plans the packed model.
    pub fn new(src: &Path, opts: &PackOptions) -> Result<PackPlan> {
        let cfg_path = src.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            msg: e.to_string(),
        })?;
        let cfg = ModelConfig::from_json(&raw, &cfg_path)?;
        let store = TensorStore::open_checkpoint(src, &cfg)?;
        let experts = StoreExperts::new(&store, &cfg)?;
        // Every check loading makes (each tensor's dtype and shape against the config) before
        // anything is written: a checkpoint `run` would refuse is refused in seconds, not after
        // hours of conversion. Loading views the mapped checkpoint; it copies nothing large.
        Model::load(
            cfg.clone(),
            &store,
            Box::new(StoreExperts::new(&store, &cfg)?),
        )?;
        let moe_layers: Vec<usize> = (0..cfg.num_layers)
            .filter(|&l| cfg.is_moe_layer(l))
            .collect();
        let kind = match store.layout {
            SourceLayout::Mlx => "mlx",
            _ => "hf",
        };

        // The source's expert format decides the defaults and whether bytes can be copied.
        let first = match moe_layers.first() {
            Some(&l) => Some(experts.fetch(l, &[0])?.remove(0)),
            None => None,
        };
        let (src_bits, src_group, src_sdtype) = match first.as_ref().map(|e| &e.gate) {
            Some(Linear::Affine {
                bits,
                group,
                sdtype,
                ..
            }) => (Some(*bits), Some(*group), *sdtype),
            Some(Linear::Dense { dtype, .. }) if *dtype != DType::F32 => (None, None, *dtype),
            _ => (None, None, DType::BF16),
        };
        let bits = opts.bits.or(src_bits).unwrap_or(4);
        let group = opts.group_size.or(src_group).unwrap_or(64);
        if !matches!(bits, 2 | 4 | 8 | 16) {
            return Err(Error::Invalid(format!("--bits {bits}: use 2, 4, 8 or 16")));
        }
        if !matches!(group, 32 | 64 | 128) {
            return Err(Error::Invalid(format!(
                "--group-size {group}: use 32, 64 or 128"
            )));
        }
        if let Some(d) = opts.dense_bits {
            if !matches!(d, 4 | 8 | 16) {
                return Err(Error::Invalid(format!("--dense-bits {d}: use 4, 8 or 16")));
            }
        }
        let dense_bits = opts
            .dense_bits
            .or_else(|| default_dense_bits(bits, store.layout == SourceLayout::Mlx));
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        if bits != 16 {
            // Quantised rows must be whole groups: name the dimension that is not.
            for (name, n) in [("hidden_size", h), ("moe_intermediate_size", i)] {
                if n % group != 0 {
                    return Err(Error::Invalid(format!(
                        "group size {group} does not divide {name} {n}: choose a --group-size that \
                         divides both hidden_size {h} and moe_intermediate_size {i}"
                    )));
                }
            }
        }
        let same_format = src_bits == Some(bits) && src_group == Some(group);
        let sdtype = if (bits == 16 && src_bits.is_none()) || same_format {
            src_sdtype
        } else {
            DType::BF16
        };
        let layout = ExpertLayout::build(bits, group, i, h, sdtype, cfg.num_experts);
        let mut dense_layout = DenseLayout::default();
        let dense_group = opts.group_size.unwrap_or(64);
        let dense_jobs = plan_dense(&store, &cfg, dense_bits, dense_group, &mut dense_layout)?;
        Ok(PackPlan {
            store,
            cfg,
            raw,
            experts,
            kind,
            bits,
            group,
            src_bits,
            src_group,
            dense_bits,
            layout,
            moe_layers,
            dense_layout,
            dense_jobs,
        })
    }

    /// Source bytes of every tensor (the progress total).
    pub fn total_bytes(&self) -> u64 {
        self.store
            .tensors
            .values()
            .map(|t| t.buf.len() as u64)
            .sum()
    }

    /// Disk the packed model needs, about: experts at the output stride, dense tensors at most
    /// their source size.
    pub fn need_bytes(&self) -> u64 {
        let n_experts = self.moe_layers.len() as u64 * self.cfg.num_experts as u64;
        n_experts * self.layout.stride
            + self
                .total_bytes()
                .saturating_sub(n_experts * self.experts.expert_bytes() as u64)
    }

    /// Expert bits of the packed model.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Starts writing into `dir` (which exists). `resume` keeps an interrupted run's
    /// `dense.bin` (its finished units are then given with [`Packer::mark_done`]).
    pub fn start(self, dir: &Path, resume: bool) -> Result<Packer> {
        let experts_dir = dir.join("experts");
        std::fs::create_dir_all(&experts_dir).map_err(|e| Error::io(&experts_dir, e))?;
        let mut plan = self;
        let layout = std::mem::take(&mut plan.dense_layout);
        let dw = DenseWriter::with_layout(dir, layout, !resume)?;
        Ok(Packer {
            plan,
            dw,
            out: dir.to_path_buf(),
            done: BTreeMap::new(),
        })
    }
}

/// A plan being carried out into a directory.
pub struct Packer {
    plan: PackPlan,
    dw: DenseWriter,
    out: PathBuf,
    done: BTreeMap<Unit, UnitDone>,
}

impl Packer {
    /// Every unit, dense tensors first (name order), then layers: the order `pack` runs them.
    pub fn units(&self) -> Vec<UnitInfo> {
        let store = &self.plan.store;
        let info = |unit, names: &mut dyn Iterator<Item = &String>| {
            let (mut files, mut bytes) = (BTreeSet::new(), 0u64);
            for n in names {
                if let Some(t) = store.tensors.get(n) {
                    files.insert(t.file.clone());
                    bytes += t.buf.len() as u64;
                }
            }
            UnitInfo { unit, files, bytes }
        };
        let mut out: Vec<UnitInfo> = self
            .plan
            .dense_jobs
            .iter()
            .enumerate()
            .map(|(i, j)| info(Unit::Dense(i), &mut j.inputs.iter()))
            .collect();
        for &l in &self.plan.moe_layers {
            let prefix = format!("layers.{l}.mlp.");
            out.push(info(
                Unit::Layer(l),
                &mut store
                    .tensors
                    .keys()
                    .filter(|n| n.starts_with(&prefix) && is_expert_tensor(n)),
            ));
        }
        out
    }

    /// Records a unit an earlier run finished (its bytes are on disk already).
    pub fn mark_done(&mut self, unit: Unit, done: UnitDone) {
        self.done.insert(unit, done);
    }

    pub fn is_done(&self, unit: Unit) -> bool {
        self.done.contains_key(&unit)
    }

    /// Flushes `dense.bin` (before the caller records units as done).
    pub fn sync(&self) -> Result<()> {
        self.dw.sync()
    }

    /// Writes one unit; every shard holding its tensors must be complete.
    pub fn run(&mut self, unit: Unit, prog: &dyn Progress) -> Result<UnitDone> {
        let done = match unit {
            Unit::Dense(i) => {
                let job =
                    self.plan.dense_jobs.get(i).ok_or_else(|| {
                        Error::Invalid(format!("dense unit {i} is not in the plan"))
                    })?;
                run_dense(&self.plan.store, job, &self.dw, prog)?;
                UnitDone::default()
            }
            Unit::Layer(l) => self.run_layer(l, prog)?,
        };
        self.done.insert(unit, done.clone());
        Ok(done)
    }

    fn run_layer(&self, l: usize, prog: &dyn Progress) -> Result<UnitDone> {
        let layout = &self.plan.layout;
        let mut lw = LayerWriter::create(&self.out, l, layout.stride, layout.expert_bytes)?;
        let (mut copied, mut converted) = (0usize, 0usize);
        let batch = rayon::current_num_threads().max(1) * 2;
        let ids: Vec<usize> = (0..self.plan.cfg.num_experts).collect();
        for chunk in ids.chunks(batch) {
            let ws = self.plan.experts.fetch(l, chunk)?;
            let enc: Vec<(Vec<u8>, bool, usize)> = ws
                .par_iter()
                .map(|w| {
                    let mut buf = vec![0u8; layout.expert_bytes as usize];
                    let c = encode_expert(layout, w, &mut buf);
                    (buf, c, w.nbytes())
                })
                .collect();
            for (buf, c, n) in enc {
                lw.push(&buf)?;
                if c {
                    copied += 1;
                } else {
                    converted += 1;
                }
                prog.advance(n as u64);
            }
        }
        Ok(UnitDone {
            layer: Some(lw.finish()?),
            copied,
            converted,
        })
    }

    /// Once every unit is done: checksums `dense.bin`, copies the text files of `text_src`,
    /// writes `config.json`, and returns the manifest (not yet written: committing it is the
    /// caller's last step) and the report (`dst` is the directory written).
    pub fn finish(self, text_src: &Path, source_path: &str) -> Result<(Manifest, PackReport)> {
        if let Some(u) = self
            .units()
            .iter()
            .find(|u| !self.done.contains_key(&u.unit))
        {
            return Err(packed_err(
                &self.out,
                format!("cannot finish: {:?} was never written", u.unit),
            ));
        }
        let p = self.plan;
        let dense = self.dw.finish()?;
        let mut layout = p.layout;
        let (mut copied, mut converted) = (0, 0);
        for d in self.done.values() {
            copied += d.copied;
            converted += d.converted;
        }
        for l in &p.moe_layers {
            let lf = self.done[&Unit::Layer(*l)].layer.clone().ok_or_else(|| {
                packed_err(&self.out, format!("layer {l}: no expert file recorded"))
            })?;
            layout.layers.push(lf);
        }
        let text_files = copy_text_files(text_src, &self.out)?;
        let config = strip_quantization(&p.raw);
        let pretty = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::Invalid(format!("serialising config.json: {e}")))?;
        let cfg_out = self.out.join("config.json");
        std::fs::write(&cfg_out, &pretty).map_err(|e| Error::io(&cfg_out, e))?;
        let manifest = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            source: json!({
                "kind": p.kind,
                "path": source_path,
                "expert_bits": p.src_bits.unwrap_or(16),
                "expert_group_size": p.src_group,
                "dense_bits": p.dense_bits,
            }),
            config,
            dense,
            experts: layout,
        };
        let report = PackReport {
            dst: self.out.clone(),
            source_kind: p.kind,
            expert_bits: p.bits,
            group_size: p.group,
            experts_copied: copied,
            experts_converted: converted,
            dense_bytes: manifest.dense.nbytes,
            expert_file_bytes: manifest.experts.layers.iter().map(|l| l.nbytes).sum(),
            text_files,
        };
        Ok((manifest, report))
    }
}
