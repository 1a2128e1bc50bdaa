//! The WGSL sources, by kernel name. The products and embed are `scales.wgsl` and `mat.wgsl`
//! (weight access) followed by their own file; the fast affine products ([`Fast`]) are
//! `scales.wgsl`, constants written per adapter, `fast.wgsl`, a reduction and an entry file.
//! [`all`] is what the MSL translation test walks.

const SCALES: &str = include_str!("shaders/scales.wgsl");
const MAT: &str = include_str!("shaders/mat.wgsl");
/// The ranking argmax and top-k share (`better`, `NONE`).
const PICK: &str = include_str!("shaders/pick.wgsl");
/// The parameters (binding 0, and the jobs) of the products, slow and fast alike.
const MATMUL_P: &str = include_str!("shaders/matmul_p.wgsl");
const EXPERT_P: &str = include_str!("shaders/expert_p.wgsl");

/// How the fast affine products (`fast.wgsl`) run on an adapter: `lg` lanes share `r` rows,
/// `wgs` threads per workgroup; lane sums added by subgroup operations (`subgroup`, where
/// `lg` is the adapter's fixed subgroup size) or through workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fast {
    pub lg: u32,
    pub wgs: u32,
    pub r: u32,
    pub subgroup: bool,
}

/// The entry files of the fast products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastKind {
    /// `fast_matmul.wgsl`.
    Matmul,
    /// `fast_expert.wgsl` (one token per job).
    Expert,
}

impl Fast {
    /// Whether the numbers fit the kernel: powers of two, `lg` dividing `wgs`.
    pub fn valid(&self) -> bool {
        let p2 = |v: u32| v.is_power_of_two();
        p2(self.lg) && p2(self.wgs) && self.wgs >= self.lg && matches!(self.r, 1 | 2 | 4)
    }

    /// Rows per workgroup.
    pub fn rows_per_group(&self) -> usize {
        (self.wgs / self.lg * self.r) as usize
    }

    /// The pipeline name of this configuration for `kind`, `bits` and `tb` tokens per
    /// workgroup; [`source`] reads it back.
    pub fn key(&self, kind: FastKind, bits: u32, tb: u32) -> String {
        let k = match kind {
            FastKind::Matmul => "matmul",
            FastKind::Expert => "expert",
        };
        let red = if self.subgroup { "sg" } else { "wg" };
        format!(
            "fast_{k}_b{bits}_t{tb}_r{}_lg{}_wg{}_{red}",
            self.r, self.lg, self.wgs
        )
    }

    /// Parses [`Fast::key`].
    fn parse(key: &str) -> Option<(Fast, FastKind, u32, u32)> {
        let f: Vec<&str> = key.strip_prefix("fast_")?.split('_').collect();
        let [k, b, t, r, lg, wg, red] = f.as_slice() else {
            return None;
        };
        let num = |s: &str, p: &str| s.strip_prefix(p)?.parse::<u32>().ok();
        let kind = match *k {
            "matmul" => FastKind::Matmul,
            "expert" => FastKind::Expert,
            _ => return None,
        };
        let fast = Fast {
            lg: num(lg, "lg")?,
            wgs: num(wg, "wg")?,
            r: num(r, "r")?,
            subgroup: match *red {
                "sg" => true,
                "wg" => false,
                _ => return None,
            },
        };
        let (bits, tb) = (num(b, "b")?, num(t, "t")?);
        (fast.valid() && matches!(bits, 2 | 4 | 8) && matches!(tb, 1 | 8))
            .then_some((fast, kind, bits, tb))
    }

    /// The full WGSL of this configuration for `kind`, `bits` and `tb`.
    pub fn source(&self, kind: FastKind, bits: u32, tb: u32) -> String {
        let consts = format!(
            "const BITS: u32 = {bits}u;\nconst R: u32 = {}u;\nconst TB: u32 = {tb}u;\n\
             const LG: u32 = {}u;\nconst WGS: u32 = {}u;\n",
            self.r, self.lg, self.wgs
        );
        let red = if self.subgroup {
            include_str!("shaders/reduce_sg.wgsl")
        } else {
            include_str!("shaders/reduce_wg.wgsl")
        };
        let (params, entry) = match kind {
            FastKind::Matmul => (MATMUL_P, include_str!("shaders/fast_matmul.wgsl")),
            FastKind::Expert => (EXPERT_P, include_str!("shaders/fast_expert.wgsl")),
        };
        let fast = include_str!("shaders/fast.wgsl");
        format!("{SCALES}\n{consts}\n{fast}\n{red}\n{params}\n{entry}")
    }
}

/// `(name, full WGSL source)` of every kernel, the fast products in the variants the backend
/// chooses among (both reductions, every width, one and eight tokens).
pub fn all() -> Vec<(String, String)> {
    let with_mat = |s: &str| format!("{SCALES}\n{MAT}\n{s}");
    let mut v: Vec<(String, String)> = vec![
        (
            "matmul".into(),
            with_mat(&format!(
                "{MATMUL_P}\n{}",
                include_str!("shaders/matmul.wgsl")
            )),
        ),
        (
            "expert".into(),
            with_mat(&format!(
                "{EXPERT_P}\n{}",
                include_str!("shaders/expert.wgsl")
            )),
        ),
        ("embed".into(), with_mat(include_str!("shaders/embed.wgsl"))),
        ("norm".into(), include_str!("shaders/norm.wgsl").into()),
        ("ew".into(), include_str!("shaders/ew.wgsl").into()),
        ("rope".into(), include_str!("shaders/rope.wgsl").into()),
        (
            "attention".into(),
            include_str!("shaders/attention.wgsl").into(),
        ),
        ("conv".into(), include_str!("shaders/conv.wgsl").into()),
        ("delta".into(), include_str!("shaders/delta.wgsl").into()),
        (
            "topk".into(),
            format!("{PICK}\n{}", include_str!("shaders/topk.wgsl")),
        ),
        (
            "argmax".into(),
            format!("{PICK}\n{}", include_str!("shaders/argmax.wgsl")),
        ),
        ("esum".into(), include_str!("shaders/esum.wgsl").into()),
        (
            "slotjobs".into(),
            include_str!("shaders/slotjobs.wgsl").into(),
        ),
    ];
    for subgroup in [false, true] {
        let f = Fast {
            lg: 32,
            wgs: 128,
            r: 2,
            subgroup,
        };
        for bits in [2, 4, 8] {
            for (kind, tb) in [
                (FastKind::Matmul, 1),
                (FastKind::Matmul, 8),
                (FastKind::Expert, 1),
            ] {
                v.push((f.key(kind, bits, tb), f.source(kind, bits, tb)));
            }
        }
    }
    v
}

/// The source of kernel `name` and its entry point: `matmul_rows` and `expert_rows` are the
/// one-thread-per-row entry points (`per_row`) of `matmul.wgsl` and `expert.wgsl`,
/// `argmax_part` the first dispatch (`part`) of `argmax.wgsl`; `fast_*` names are
/// [`Fast::key`]s.
pub fn source(name: &str) -> Option<(String, &'static str)> {
    if let Some((f, kind, bits, tb)) = Fast::parse(name) {
        return Some((f.source(kind, bits, tb), "main"));
    }
    let (file, entry) = match name {
        "matmul_rows" => ("matmul", "per_row"),
        "expert_rows" => ("expert", "per_row"),
        "argmax_part" => ("argmax", "part"),
        n => (n, "main"),
    };
    all()
        .into_iter()
        .find(|(n, _)| *n == file)
        .map(|(_, s)| (s, entry))
}
