//! The crate's one runtime CPU feature detection, and [`multiversion!`], the dispatch of a
//! function compiled once per SIMD level.
//!
//! Features are detected once per process ([`OnceLock`]). Everything that picks a code path by
//! CPU asks here: the decode GEMV, the GEMM's kernels and packing, the elementwise passes, the
//! Winograd row split, and the test hooks that force a named path (`linear_rows_on`,
//! `gemm::gemm_on`).

use std::sync::OnceLock;

/// SIMD level of the code compiled per level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    Scalar,
}

impl Level {
    /// Every level, best first.
    pub(crate) const ALL: [Level; 3] = [Level::Avx512, Level::Avx2, Level::Scalar];

    /// The level's name ("avx512", "avx2", "scalar"), as logs, benchmarks and the forced-path
    /// test hooks spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
            Level::Scalar => "scalar",
        }
    }

    /// The level named `name` (see [`Level::name`]), if any.
    pub(crate) fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// What this CPU has.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    /// The best supported level.
    level: Level,
    /// avx512f.
    avx512f: bool,
    /// avx2 and fma.
    avx2_fma: bool,
    /// avx512f and avx512bf16 (`vdpbf16ps`, `vcvtneps2bf16`).
    avx512bf16: bool,
    /// avx2, fma and f16c (the quantized decode dots read f16 block scales).
    avx2_f16c: bool,
    /// avx512f, avx512bw, avx512vl and avx512vnni (`vpdpbusd`), with f16c: the quantized
    /// decode dots on 512-bit registers.
    avx512vnni: bool,
}

fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    let avx512f = is_x86_feature_detected!("avx512f");
    let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512bf16 = avx512f && is_x86_feature_detected!("avx512bf16");
    let avx2_f16c = avx2_fma && is_x86_feature_detected!("f16c");
    let avx512vnni = avx512f
        && avx2_f16c
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    let level = if avx512f {
        Level::Avx512
    } else if avx2_fma {
        Level::Avx2
    } else {
        Level::Scalar
    };
    Cpu {
        level,
        avx512f,
        avx2_fma,
        avx512bf16,
        avx2_f16c,
        avx512vnni,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Cpu {
    Cpu {
        level: Level::Scalar,
        avx512f: false,
        avx2_fma: false,
        avx512bf16: false,
        avx2_f16c: false,
        avx512vnni: false,
    }
}

/// The best level this CPU supports.
pub(crate) fn level() -> Level {
    cpu().level
}

/// Whether this CPU supports `l` (avx512: avx512f; avx2: avx2 and fma; scalar: always).
pub(crate) fn supported(l: Level) -> bool {
    match l {
        Level::Avx512 => cpu().avx512f,
        Level::Avx2 => cpu().avx2_fma,
        Level::Scalar => true,
    }
}

/// Whether this CPU has avx512f and avx512bf16 (native bf16 dot products and conversions).
pub(crate) fn has_avx512bf16() -> bool {
    cpu().avx512bf16
}

/// Whether this CPU has avx2, fma and f16c (the quantized decode dots).
pub(crate) fn has_avx2_f16c() -> bool {
    cpu().avx2_f16c
}

/// Whether this CPU has avx512f/bw/vl, avx512vnni and f16c (the quantized decode dots on
/// 512-bit registers).
pub(crate) fn has_avx512vnni() -> bool {
    cpu().avx512vnni
}

/// Instantiates `$body` (a `fn(&mut [f32])`-like inline function) once per SIMD level and
/// dispatches on the detected level.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn v512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v256($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match $crate::cpu::level() {
                    // SAFETY: the level was detected on this CPU (avx512f).
                    $crate::cpu::Level::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: the level was detected on this CPU (avx2 and fma).
                    $crate::cpu::Level::Avx2 => return unsafe { v256($($arg),*) },
                    $crate::cpu::Level::Scalar => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;
