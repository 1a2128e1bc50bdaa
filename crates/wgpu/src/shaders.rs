//! The WGSL sources, by kernel name. The products and embed are `scales.wgsl` and `mat.wgsl`
//! (weight access) followed by their own file; the fast affine products ([`Fast`]) are
//! `scales.wgsl`, constants written per adapter, `fast_io.wgsl`, `fast.wgsl` (or `fast_step.wgsl`
//! and `fast_dec.wgsl`, the one-token form, or `fast_half.wgsl`, its f16 twin), a reduction and
//! an entry file.
//! [`all`] is what the MSL translation test walks.

const SCALES: &str = include_str!("shaders/scales.wgsl");
const MAT: &str = include_str!("shaders/mat.wgsl");
/// The ranking argmax and top-k share (`better`, `NONE`).
const PICK: &str = include_str!("shaders/pick.wgsl");
/// The one-token forms of the fast products, after what they share (`fast_step.wgsl`).
const FAST_DEC: &str = concat!(
    include_str!("shaders/fast_step.wgsl"),
    "\n",
    include_str!("shaders/fast_dec.wgsl")
);
const FAST_HALF: &str = concat!(
    include_str!("shaders/fast_step.wgsl"),
    "\n",
    include_str!("shaders/fast_half.wgsl")
);
/// The parameters (binding 0, and the jobs) of the products, slow and fast alike.
const MATMUL_P: &str = include_str!("shaders/matmul_p.wgsl");
const EXPERT_P: &str = include_str!("shaders/expert_p.wgsl");

/// How the fast affine products (`fast.wgsl`) run on an adapter: `lg` lanes share `r` rows,
/// `wgs` threads per workgroup; lane sums added by subgroup operations (`subgroup`, where
/// `lg` is the adapter's fixed subgroup size) or through workgroup memory; `form`: which
/// kernel runs the one-token products; `lean`: their shader modules are created without
/// naga's forced loop bounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fast {
    pub lg: u32,
    pub wgs: u32,
    pub r: u32,
    pub subgroup: bool,
    pub form: Form,
    /// Without `force_loop_bounding` (wgpu's `ShaderRuntimeChecks`; bounds checks stay on):
    /// naga otherwise gives every loop a 64-bit iteration counter that breaks out at zero,
    /// which a driver cannot see through, so the constant loops over a chunk's words and a
    /// lane group's rows may stay loops and the per-lane arrays indexed by their counters
    /// may live in local memory instead of registers. The fast kernels' loops end by their
    /// own bounds (constants or dispatch parameters, steps that cannot wrap for the shapes
    /// the ops accept), which is what the option asks the caller to promise.
    pub lean: bool,
}

/// The kernel of the one-token products (decode, and the routed-expert batch, one token per
/// job) of a [`Fast`] configuration; products of several tokens always run `fast.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// `fast.wgsl` (group and scale dtype read at run time).
    Plain,
    /// `fast_dec.wgsl`: group and scale dtype compiled in (one pipeline per matrix format),
    /// `span` 16-byte chunks per row loaded per lane step, the codes as floats without a
    /// shift per code, four FMA chains per row.
    Decode { span: u32 },
    /// `fast_half.wgsl`: [`Form::Decode`] with codes, x and products in f16 (packed
    /// half-precision FMAs), partial sums turned f32 at each group or chunk end; only on a
    /// device with `SHADER_F16` ([`Wgpu::has_f16`](crate::Wgpu::has_f16)). 2- and 4-bit
    /// matrices only: 8-bit ones (MLX's routers and gates, whose small errors can flip a
    /// routing choice, and which are read-bound at one code per byte) run [`Form::Decode`].
    /// Products carry f16's rounding (~5e-4 relative rms against ~1e-7 in f32).
    Half { span: u32 },
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
    /// Whether the numbers fit the kernel: powers of two, `lg` dividing `wgs`, up to four rows
    /// per lane group (eight in the decode form, whose per-row state is one token's).
    pub fn valid(&self) -> bool {
        let p2 = |v: u32| v.is_power_of_two();
        let (form, rows) = match self.form {
            Form::Plain => (true, 4),
            Form::Decode { span } | Form::Half { span } => (matches!(span, 1 | 2 | 4), 8),
        };
        p2(self.lg) && p2(self.wgs) && self.wgs >= self.lg && p2(self.r) && self.r <= rows && form
    }

    /// Rows per workgroup.
    pub fn rows_per_group(&self) -> usize {
        (self.wgs / self.lg * self.r) as usize
    }

    /// This configuration as a product of `tb` tokens per workgroup of the affine matrix of
    /// format words `m` (fmt, bits, group, sdtype) runs it: [`Form::Decode`] (and
    /// [`Form::Half`], as [`Form::Decode`] for 8-bit codes) only for one token
    /// and a group of whole words whose boundaries fall on a chunk's word boundaries at
    /// constant places (a power of two of words), else [`Form::Plain`] at no more than its four
    /// rows per lane group. Callers take rows per workgroup from the result.
    pub fn for_product(self, m: [u32; 4], tb: u32) -> Fast {
        let [_, bits, group, sfmt] = m;
        let per = 32 / bits.max(1);
        let fits = tb == 1
            && sfmt <= 2
            && matches!(bits, 2 | 4 | 8)
            && group.is_multiple_of(per)
            && (group / per).is_power_of_two();
        match self.form {
            Form::Half { span } if fits && bits == 8 => Fast {
                form: Form::Decode { span },
                ..self
            },
            Form::Decode { .. } | Form::Half { .. } if fits => self,
            _ => Fast {
                form: Form::Plain,
                r: self.r.min(4),
                ..self
            },
        }
    }

    /// The configuration as one word: `r2_lg32_wg256_sg` (`_wg`: workgroup-memory sums), with
    /// `_d2` for [`Form::Decode`] of span 2 (`_d2_h`: [`Form::Half`]) and `_lean` for
    /// [`Fast::lean`];
    /// [`Fast::from_spec`] reads it back (the `FLASHMOE_WGPU_FAST` option of the CLI).
    pub fn spec(&self) -> String {
        let red = if self.subgroup { "sg" } else { "wg" };
        let form = match self.form {
            Form::Plain => String::new(),
            Form::Decode { span } => format!("_d{span}"),
            Form::Half { span } => format!("_d{span}_h"),
        };
        let lean = if self.lean { "_lean" } else { "" };
        format!("r{}_lg{}_wg{}_{red}{form}{lean}", self.r, self.lg, self.wgs)
    }

    /// Parses [`Fast::spec`]; `None` for anything else or a configuration not [`valid`].
    ///
    /// [`valid`]: Fast::valid
    pub fn from_spec(spec: &str) -> Option<Fast> {
        let f: Vec<&str> = spec.split('_').collect();
        Self::from_fields(&f)
    }

    fn from_fields(f: &[&str]) -> Option<Fast> {
        let num = |s: &str, p: &str| s.strip_prefix(p)?.parse::<u32>().ok();
        let (f, lean) = match f {
            [b @ .., "lean"] => (b, true),
            b => (b, false),
        };
        let (base, form) = match f {
            [b @ .., d, "h"] if d.starts_with('d') => (b, Form::Half { span: num(d, "d")? }),
            [b @ .., d] if d.starts_with('d') => (b, Form::Decode { span: num(d, "d")? }),
            b => (b, Form::Plain),
        };
        let [r, lg, wg, red] = base else {
            return None;
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
            form,
            lean,
        };
        fast.valid().then_some(fast)
    }

    /// The pipeline name of this configuration for `kind`, a matrix of format words `m` and
    /// `tb` tokens per workgroup (the form [`Fast::for_product`] gives; a decode kernel's name
    /// ends in its group and scale dtype); [`source`] reads it back.
    pub fn key(&self, kind: FastKind, m: [u32; 4], tb: u32) -> String {
        let k = match kind {
            FastKind::Matmul => "matmul",
            FastKind::Expert => "expert",
        };
        let f = self.for_product(m, tb);
        let fmt = match f.form {
            Form::Plain => String::new(),
            Form::Decode { .. } | Form::Half { .. } => format!("_g{}_s{}", m[2], m[3]),
        };
        format!("fast_{k}_b{}_t{tb}_{}{fmt}", m[1], f.spec())
    }

    /// Parses [`Fast::key`]: the configuration, kind, format words (group and scale dtype 0
    /// where the plain kernel reads them at run time) and tokens per workgroup.
    fn parse(key: &str) -> Option<(Fast, FastKind, [u32; 4], u32)> {
        let f: Vec<&str> = key.strip_prefix("fast_")?.split('_').collect();
        let num = |s: &str, p: &str| s.strip_prefix(p)?.parse::<u32>().ok();
        let (head, rest) = f.split_at_checked(3)?;
        let [k, b, t] = head else {
            return None;
        };
        let kind = match *k {
            "matmul" => FastKind::Matmul,
            "expert" => FastKind::Expert,
            _ => return None,
        };
        let (bits, tb) = (num(b, "b")?, num(t, "t")?);
        let (spec, group, sfmt) = match rest {
            [s @ .., g, sf] if g.starts_with('g') => (s, num(g, "g")?, num(sf, "s")?),
            s => (s, 0, 0),
        };
        let fast = Self::from_fields(spec)?;
        let m = [3, bits, group, sfmt];
        let ok = matches!(bits, 2 | 4 | 8)
            && matches!(tb, 1 | 8)
            && fast.for_product(m, tb) == fast
            && (fast.form == Form::Plain) == (group == 0);
        ok.then_some((fast, kind, m, tb))
    }

    /// The full WGSL of this configuration for `kind`, the matrix format words `m` and `tb`
    /// (the form [`Fast::for_product`] gives).
    pub fn source(&self, kind: FastKind, m: [u32; 4], tb: u32) -> String {
        let f = self.for_product(m, tb);
        let mut consts = format!(
            "const BITS: u32 = {}u;\nconst R: u32 = {}u;\nconst TB: u32 = {tb}u;\n\
             const LG: u32 = {}u;\nconst WGS: u32 = {}u;\n",
            m[1], f.r, f.lg, f.wgs
        );
        let (body, enable) = match f.form {
            Form::Plain => (include_str!("shaders/fast.wgsl"), ""),
            Form::Decode { span } | Form::Half { span } => {
                consts += &format!(
                    "const SPAN: u32 = {span}u;\nconst GROUP: u32 = {}u;\nconst SFMT: u32 = {}u;\n",
                    m[2], m[3]
                );
                match f.form {
                    Form::Half { .. } => (FAST_HALF, "enable f16;\n"),
                    _ => (FAST_DEC, ""),
                }
            }
        };
        let red = if f.subgroup {
            include_str!("shaders/reduce_sg.wgsl")
        } else {
            include_str!("shaders/reduce_wg.wgsl")
        };
        let (params, entry) = match kind {
            FastKind::Matmul => (MATMUL_P, include_str!("shaders/fast_matmul.wgsl")),
            FastKind::Expert => (EXPERT_P, include_str!("shaders/fast_expert.wgsl")),
        };
        let io = include_str!("shaders/fast_io.wgsl");
        format!("{enable}{SCALES}\n{consts}\n{io}\n{body}\n{red}\n{params}\n{entry}")
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
    // The fast products: plain in both reductions for every code width, one and eight
    // tokens; the decode form and its f16 twin at each width in groups of 32 and 128 with each
    // scale dtype.
    for subgroup in [false, true] {
        for form in [
            Form::Plain,
            Form::Decode { span: 2 },
            Form::Half { span: 2 },
        ] {
            let f = Fast {
                lg: 32,
                wgs: 128,
                r: 2,
                subgroup,
                form,
                lean: false,
            };
            for bits in [2, 4, 8] {
                let mut cases = vec![
                    (FastKind::Matmul, [3, bits, 64, 1], 1),
                    (FastKind::Matmul, [3, bits, 64, 1], 8),
                    (FastKind::Expert, [3, bits, 64, 1], 1),
                ];
                if form != Form::Plain {
                    cases = [32, 128]
                        .into_iter()
                        .flat_map(|g| (0..3).map(move |s| [3, bits, g, s]))
                        .flat_map(|m| [(FastKind::Matmul, m, 1), (FastKind::Expert, m, 1)])
                        .collect();
                }
                for (kind, m, tb) in cases {
                    // Once per kernel (the f16 form's 8-bit products are the decode form's).
                    let key = f.key(kind, m, tb);
                    if !v.iter().any(|(n, _)| *n == key) {
                        v.push((key, f.source(kind, m, tb)));
                    }
                }
            }
        }
    }
    v
}

/// Whether kernel `name`'s module is created without forced loop bounding ([`Fast::lean`]).
pub fn lean(name: &str) -> bool {
    Fast::parse(name).is_some_and(|(f, ..)| f.lean)
}

/// The source of kernel `name` and its entry point: `matmul_rows` and `expert_rows` are the
/// one-thread-per-row entry points (`per_row`) of `matmul.wgsl` and `expert.wgsl`,
/// `argmax_part` the first dispatch (`part`) of `argmax.wgsl`, `add_norm` the residual join
/// and norm (`add`) of `norm.wgsl`; `fast_*` names are
/// [`Fast::key`]s.
pub fn source(name: &str) -> Option<(String, &'static str)> {
    if let Some((f, kind, m, tb)) = Fast::parse(name) {
        return Some((f.source(kind, m, tb), "main"));
    }
    let (file, entry) = match name {
        "matmul_rows" => ("matmul", "per_row"),
        "expert_rows" => ("expert", "per_row"),
        "argmax_part" => ("argmax", "part"),
        "add_norm" => ("norm", "add"),
        n => (n, "main"),
    };
    all()
        .into_iter()
        .find(|(n, _)| *n == file)
        .map(|(_, s)| (s, entry))
}
