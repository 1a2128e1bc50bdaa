//! [`Kernel`]: the identity of every kernel in kernels.cu as a value, so a launch names its
//! kernel by a typed enum (no name built with `format!`, no string hashing per launch) and the
//! device keeps its functions in a `Vec` at [`Kernel::index`].
//!
//! [`Kernel::ALL`]-order is the load order; [`Kernel::name`] (the PTX entry) is used only to load
//! the module, in errors and in the trace, and [`Kernel::from_name`] is its inverse (tests check
//! that every name round-trips and is an entry of the PTX).
use std::fmt;

/// Code width of an affine-quantised matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bits {
    B2,
    B4,
    B8,
}

impl Bits {
    pub const ALL: [Bits; 3] = [Bits::B2, Bits::B4, Bits::B8];

    /// 2, 4 or 8 (None for other widths).
    pub const fn of(bits: u32) -> Option<Bits> {
        match bits {
            2 => Some(Bits::B2),
            4 => Some(Bits::B4),
            8 => Some(Bits::B8),
            _ => None,
        }
    }

    pub const fn bits(self) -> u32 {
        match self {
            Bits::B2 => 2,
            Bits::B4 => 4,
            Bits::B8 => 8,
        }
    }

    const fn ord(self) -> usize {
        self as usize
    }
}

/// Element type of dense weights or of affine scales and biases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dt {
    Bf16,
    F16,
    F32,
}

impl Dt {
    pub const ALL: [Dt; 3] = [Dt::Bf16, Dt::F16, Dt::F32];

    /// From `ops::Fmt`'s code (0 = bf16, 1 = f16, 2 = f32).
    pub const fn from_code(c: u8) -> Option<Dt> {
        match c {
            0 => Some(Dt::Bf16),
            1 => Some(Dt::F16),
            2 => Some(Dt::F32),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Dt::Bf16 => "bf16",
            Dt::F16 => "f16",
            Dt::F32 => "f32",
        }
    }

    const fn ord(self) -> usize {
        self as usize
    }
}

/// Variants of the affine matrix-vector kernels `qmv{bits}_{scale}_{var}` (ops.rs says what
/// each does): exact float with x in shared memory (`mv`, and fewer rows per warp `mv1`,
/// `mv2`), x in global memory (`mvg`), prepared-x dp4a (`mp`, with epilogues `mpc`, `mpa`),
/// tensor cores (`mt1`, `mt2`), prefill (`mm`); `..i` read their problems from device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QVar {
    Mv,
    Mv1,
    Mv2,
    Mvg,
    Mvi,
    Mv1i,
    Mv2i,
    Mp,
    Mpi,
    Mpc,
    Mpa,
    Mm,
    Mt1,
    Mt1i,
    Mt2,
    Mt2i,
}

impl QVar {
    pub const ALL: [QVar; 16] = [
        QVar::Mv,
        QVar::Mv1,
        QVar::Mv2,
        QVar::Mvg,
        QVar::Mvi,
        QVar::Mv1i,
        QVar::Mv2i,
        QVar::Mp,
        QVar::Mpi,
        QVar::Mpc,
        QVar::Mpa,
        QVar::Mm,
        QVar::Mt1,
        QVar::Mt1i,
        QVar::Mt2,
        QVar::Mt2i,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            QVar::Mv => "mv",
            QVar::Mv1 => "mv1",
            QVar::Mv2 => "mv2",
            QVar::Mvg => "mvg",
            QVar::Mvi => "mvi",
            QVar::Mv1i => "mv1i",
            QVar::Mv2i => "mv2i",
            QVar::Mp => "mp",
            QVar::Mpi => "mpi",
            QVar::Mpc => "mpc",
            QVar::Mpa => "mpa",
            QVar::Mm => "mm",
            QVar::Mt1 => "mt1",
            QVar::Mt1i => "mt1i",
            QVar::Mt2 => "mt2",
            QVar::Mt2i => "mt2i",
        }
    }

    /// The twin that reads its problems from device memory, where there is one.
    pub const fn indirect(self) -> Option<QVar> {
        match self {
            QVar::Mv => Some(QVar::Mvi),
            QVar::Mv1 => Some(QVar::Mv1i),
            QVar::Mv2 => Some(QVar::Mv2i),
            QVar::Mp => Some(QVar::Mpi),
            QVar::Mt1 => Some(QVar::Mt1i),
            QVar::Mt2 => Some(QVar::Mt2i),
            _ => None,
        }
    }

    /// Reads its problems from device memory.
    pub const fn is_indirect(self) -> bool {
        matches!(
            self,
            QVar::Mvi | QVar::Mv1i | QVar::Mv2i | QVar::Mpi | QVar::Mt1i | QVar::Mt2i
        )
    }

    /// Reads x prepared by `quant_x3` (or its producer): the `mp` family.
    pub const fn is_prepared(self) -> bool {
        matches!(self, QVar::Mp | QVar::Mpi | QVar::Mpc | QVar::Mpa)
    }

    const fn ord(self) -> usize {
        self as usize
    }
}

/// Variants of the dense matrix-vector kernels `dmv_{dt}_{var}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DVar {
    Mv,
    Mvi,
    Mm,
}

impl DVar {
    pub const ALL: [DVar; 3] = [DVar::Mv, DVar::Mvi, DVar::Mm];

    pub const fn name(self) -> &'static str {
        match self {
            DVar::Mv => "mv",
            DVar::Mvi => "mvi",
            DVar::Mm => "mm",
        }
    }

    const fn ord(self) -> usize {
        self as usize
    }
}

/// Declares the kernels whose name has no parameters: [`Kernel`]'s unit variants, their PTX
/// names, and their dense order (a fieldless twin enum, so the index is a cast).
macro_rules! kernels {
    ($($v:ident = $n:literal,)*) => {
        /// A kernel of kernels.cu.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $($v,)*
            /// `qmv{bits}_{scale}_{var}`: affine matrix-vector products.
            Qmv { bits: Bits, scale: Dt, var: QVar },
            /// `quant_x3_{bits}` (`..i`: problems read from device memory): x prepared for the
            /// `mp` kernels.
            QuantX3 { bits: Bits, indirect: bool },
            /// `dmv_{dt}_{var}`: dense matrix-vector products.
            Dmv { dt: Dt, var: DVar },
            /// `qgemm{bits}_{scale}` (`.._t`: products read from a table in device memory):
            /// the prompt's tensor-core GEMM (gemm.rs).
            Qgemm { bits: Bits, scale: Dt, table: bool },
        }

        #[derive(Clone, Copy)]
        enum Plain { $($v,)* }

        const PLAIN: &[(Kernel, &str)] = &[$((Kernel::$v, $n),)*];

        impl Kernel {
            /// Index among the unit variants, None for the parameterised ones.
            const fn plain(self) -> Option<usize> {
                match self {
                    $(Kernel::$v => Some(Plain::$v as usize),)*
                    _ => None,
                }
            }
        }
    };
}

kernels! {
    EmbedRow = "embed_row",
    RouterExperts = "router_experts",
    SlotBatch = "slot_batch",
    ArgmaxF32 = "argmax_f32",
    GatherRows = "gather_rows",
    ScatterAddRows = "scatter_add_rows",
    AddRowsGated = "add_rows_gated",
    RmsnormRows = "rmsnorm_rows",
    AddRmsnorm = "add_rmsnorm",
    SwigluK = "swiglu_k",
    MoeCombine = "moe_combine",
    RouterTopk = "router_topk",
    AttnPrep = "attn_prep",
    AttnDecode = "attn_decode",
    GdnConv = "gdn_conv",
    GdnStep = "gdn_step",
    GdnStepWide = "gdn_step_wide",
    ChainStep = "chain_step",
    SiluMul = "silu_mul",
    MulSigmoid = "mul_sigmoid",
    QkNormRope = "qk_norm_rope",
    GdnConvRows = "gdn_conv_rows",
    GatedRmsnormRows = "gated_rmsnorm_rows",
    AttnPrefill = "attn_prefill",
    GdnRows8 = "gdn_rows8",
    GdnRows16 = "gdn_rows16",
    GdnRows32 = "gdn_rows32",
    GemmPrepX = "gemm_prep_x",
    GemmRowsCombine = "gemm_rows_combine",
}

/// First index of each parameterised family, after the unit variants.
const QMV0: usize = PLAIN.len();
const QX0: usize = QMV0 + 3 * 3 * QVar::ALL.len();
const DMV0: usize = QX0 + 3 * 2;
const QG0: usize = DMV0 + 3 * DVar::ALL.len();

impl Kernel {
    /// How many kernels there are: [`Kernel::index`] is below it.
    pub const COUNT: usize = QG0 + 3 * 3 * 2;

    /// Every kernel, in [`Kernel::index`] order.
    pub fn all() -> impl Iterator<Item = Kernel> {
        let plain = PLAIN.iter().map(|&(k, _)| k);
        let qmv = Bits::ALL.into_iter().flat_map(|bits| {
            Dt::ALL.into_iter().flat_map(move |scale| {
                QVar::ALL
                    .into_iter()
                    .map(move |var| Kernel::Qmv { bits, scale, var })
            })
        });
        let qx = Bits::ALL.into_iter().flat_map(|bits| {
            [false, true]
                .into_iter()
                .map(move |indirect| Kernel::QuantX3 { bits, indirect })
        });
        let dmv = Dt::ALL.into_iter().flat_map(|dt| {
            DVar::ALL
                .into_iter()
                .map(move |var| Kernel::Dmv { dt, var })
        });
        let qg = Bits::ALL.into_iter().flat_map(|bits| {
            Dt::ALL.into_iter().flat_map(move |scale| {
                [false, true]
                    .into_iter()
                    .map(move |table| Kernel::Qgemm { bits, scale, table })
            })
        });
        plain.chain(qmv).chain(qx).chain(dmv).chain(qg)
    }

    /// A dense index in `0..COUNT`, one per kernel (the device's function table).
    pub const fn index(self) -> usize {
        if let Some(i) = self.plain() {
            return i;
        }
        match self {
            Kernel::Qmv { bits, scale, var } => {
                QMV0 + (bits.ord() * 3 + scale.ord()) * QVar::ALL.len() + var.ord()
            }
            Kernel::QuantX3 { bits, indirect } => QX0 + bits.ord() * 2 + indirect as usize,
            Kernel::Dmv { dt, var } => DMV0 + dt.ord() * DVar::ALL.len() + var.ord(),
            Kernel::Qgemm { bits, scale, table } => {
                QG0 + (bits.ord() * 3 + scale.ord()) * 2 + table as usize
            }
            // Unit variants returned above.
            _ => 0,
        }
    }

    /// Its entry name in the PTX.
    pub fn name(self) -> String {
        self.to_string()
    }

    /// The kernel named `name` (the inverse of [`Kernel::name`]).
    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::all().find(|k| k.name() == name)
    }

    /// The `qmv` variant, when it is one.
    pub const fn qvar(self) -> Option<QVar> {
        match self {
            Kernel::Qmv { var, .. } => Some(var),
            _ => None,
        }
    }

    /// Reads x prepared for the `mp` kernels (see [`QVar::is_prepared`]).
    pub const fn is_prepared(self) -> bool {
        matches!(self, Kernel::Qmv { var, .. } if var.is_prepared())
    }

    /// The same kernel with variant `var` (matrix-vector kernels; others are returned as is).
    pub const fn with_qvar(self, var: QVar) -> Kernel {
        match self {
            Kernel::Qmv { bits, scale, .. } => Kernel::Qmv { bits, scale, var },
            k => k,
        }
    }

    /// The twin that reads its problems from device memory (`..i`), where there is one.
    pub const fn indirect(self) -> Option<Kernel> {
        match self {
            Kernel::Qmv { bits, scale, var } => match var.indirect() {
                Some(var) => Some(Kernel::Qmv { bits, scale, var }),
                None => None,
            },
            Kernel::Dmv { dt, var: DVar::Mv } => Some(Kernel::Dmv { dt, var: DVar::Mvi }),
            _ => None,
        }
    }

    /// The code width of a `qgemm` kernel (whose shared memory is opted in at load).
    pub const fn qgemm_bits(self) -> Option<Bits> {
        match self {
            Kernel::Qgemm { bits, .. } => Some(bits),
            _ => None,
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(i) = self.plain() {
            return f.write_str(PLAIN[i].1);
        }
        match *self {
            Kernel::Qmv { bits, scale, var } => {
                write!(f, "qmv{}_{}_{}", bits.bits(), scale.name(), var.name())
            }
            Kernel::QuantX3 { bits, indirect } => {
                let i = if indirect { "i" } else { "" };
                write!(f, "quant_x3_{}{i}", bits.bits())
            }
            Kernel::Dmv { dt, var } => write!(f, "dmv_{}_{}", dt.name(), var.name()),
            Kernel::Qgemm { bits, scale, table } => {
                let t = if table { "_t" } else { "" };
                write!(f, "qgemm{}_{}{t}", bits.bits(), scale.name())
            }
            _ => unreachable!("unit variants are written above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_in_all_order() {
        let all: Vec<Kernel> = Kernel::all().collect();
        assert_eq!(all.len(), Kernel::COUNT);
        for (i, k) in all.iter().enumerate() {
            assert_eq!(k.index(), i, "{k}");
        }
    }

    #[test]
    fn names_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for k in Kernel::all() {
            let n = k.name();
            assert!(seen.insert(n.clone()), "{n} named twice");
            assert_eq!(Kernel::from_name(&n), Some(k), "{n}");
        }
        assert_eq!(Kernel::from_name("qmv3_bf16_mv"), None);
        assert_eq!(Kernel::from_name(""), None);
    }

    #[test]
    fn names_keep_the_kernels_cu_spelling() {
        let q = Kernel::Qmv {
            bits: Bits::B4,
            scale: Dt::Bf16,
            var: QVar::Mv2i,
        };
        assert_eq!(q.name(), "qmv4_bf16_mv2i");
        let qx = Kernel::QuantX3 {
            bits: Bits::B8,
            indirect: true,
        };
        assert_eq!(qx.name(), "quant_x3_8i");
        let d = Kernel::Dmv {
            dt: Dt::F32,
            var: DVar::Mm,
        };
        assert_eq!(d.name(), "dmv_f32_mm");
        let g = Kernel::Qgemm {
            bits: Bits::B2,
            scale: Dt::F16,
            table: true,
        };
        assert_eq!(g.name(), "qgemm2_f16_t");
        assert_eq!(Kernel::AddRmsnorm.name(), "add_rmsnorm");
        assert_eq!(Kernel::GdnRows16.name(), "gdn_rows16");
    }

    #[test]
    fn indirect_twins_end_in_i() {
        for k in Kernel::all() {
            if let Some(t) = k.indirect() {
                assert_eq!(t.name(), format!("{k}i"));
            }
        }
    }
}
