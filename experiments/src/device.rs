//! `--device cpu|cuda`: which Burn backend a study trains on.

/// The CPU backend's label with the default matmul kernels.
const CPU: &str = "cpu (burn flex)";
/// The CPU backend's label with the gemm crate's AVX-512 kernels.
const CPU_AVX512: &str = "cpu (burn flex, AVX-512 matmul)";
/// The CUDA backend's label.
const CUDA: &str = "cuda (burn cubecl)";

/// A study's device choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Burn's CPU backend (burn-flex).
    Cpu,
    /// Burn's CUDA backend (needs the `cuda` feature).
    Cuda,
}

impl Device {
    /// Parses `--device`; `cuda` in a build without the feature is an error
    /// that says how to get one.
    pub fn parse(s: &str, study: &str) -> anyhow::Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" if cfg!(feature = "cuda") => Ok(Device::Cuda),
            "cuda" => anyhow::bail!(
                "--device cuda: this binary was built without CUDA support; rebuild with the \
                 `cuda` feature (needs the CUDA toolkit and an NVIDIA driver):\n  \
                 cargo run -p experiments --release --features cuda -- {study} --device cuda"
            ),
            other => anyhow::bail!("--device {other}: expected `cpu` or `cuda`"),
        }
    }

    /// The label the report records (on the CPU, whether the matmul kernels
    /// are AVX-512's: the `avx512` feature on a CPU that has AVX-512F).
    pub fn label(self) -> &'static str {
        match self {
            Device::Cpu if avx512_matmul() => CPU_AVX512,
            Device::Cpu => CPU,
            Device::Cuda => CUDA,
        }
    }
}

/// Calls the backend-generic function `f::<B>(args…)` with the autodiff
/// backend `dev` names: Burn flex on the CPU, Burn CUDA in a build with
/// the `cuda` feature. One place for the CPU/CUDA dispatch of every study.
macro_rules! on_device {
    ($dev:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dev {
            $crate::device::Device::Cpu => $f::<s2ft_core::CpuTrain>($($arg),*),
            #[cfg(feature = "cuda")]
            $crate::device::Device::Cuda => $f::<s2ft_core::GpuTrain>($($arg),*),
            #[cfg(not(feature = "cuda"))]
            $crate::device::Device::Cuda => {
                unreachable!("Device::parse refuses cuda without the feature")
            }
        }
    };
}
pub(crate) use on_device;

/// What to do to resume a run recorded on backend `recorded` where this
/// binary runs on `here` (two [`Device::label`]s that differ): the other
/// device, the other build, or — for AVX-512 kernels this CPU lacks — a CPU
/// that has them.
pub fn resume_hint(recorded: &str, here: &str) -> String {
    resume_hint_for(
        recorded,
        here,
        Device::Cpu.label(),
        cfg!(feature = "avx512"),
        cfg!(feature = "cuda"),
    )
}

/// [`resume_hint`] with this build's facts as arguments: `cpu_here` is the
/// label `--device cpu` gives here.
fn resume_hint_for(
    recorded: &str,
    here: &str,
    cpu_here: &str,
    avx512_built: bool,
    cuda_built: bool,
) -> String {
    if recorded == CUDA {
        return if cuda_built {
            "give it `--device cuda`".into()
        } else {
            "give it `--device cuda` in a build with the `cuda` feature".into()
        };
    }
    if ![CPU, CPU_AVX512].contains(&recorded) {
        return "this build has no such backend (an older toolkit's?): start the run again".into();
    }
    let kernels = (cpu_here != recorded).then(|| match (recorded == CPU_AVX512, avx512_built) {
        (true, true) => {
            "this CPU has no AVX-512F, and its kernels compute other bits: resume \
                         it on a CPU that has AVX-512F"
        }
        (true, false) => "resume it in a build with the `avx512` feature",
        (false, _) => "resume it in a build without the `avx512` feature",
    });
    match (here == CUDA, kernels) {
        (true, None) => "give it `--device cpu`".into(),
        (true, Some(k)) => format!("give it `--device cpu`, and {k}"),
        (false, Some(k)) => k.into(),
        (false, None) => "nothing to change: it ran on this backend".into(),
    }
}

/// Whether the gemm crate picks its AVX-512 kernels in this build on this CPU.
fn avx512_matmul() -> bool {
    #[cfg(all(feature = "avx512", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(all(feature = "avx512", target_arch = "x86_64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::{CPU, CPU_AVX512, CUDA, resume_hint_for};

    /// Each mismatch names its own cure: the device, the feature, or the CPU.
    #[test]
    fn resume_hints_name_what_differs() {
        // (recorded, here, the CPU label here, avx512 built, cuda built)
        let hint = resume_hint_for;
        assert_eq!(
            hint(CUDA, CPU, CPU, false, false),
            "give it `--device cuda` in a build with the `cuda` feature"
        );
        assert_eq!(
            hint(CUDA, CPU_AVX512, CPU_AVX512, true, true),
            "give it `--device cuda`"
        );
        assert_eq!(hint(CPU, CUDA, CPU, false, true), "give it `--device cpu`");
        // On CUDA in a build whose CPU kernels differ too: both cures at once.
        assert_eq!(
            hint(CPU_AVX512, CUDA, CPU, false, true),
            "give it `--device cpu`, and resume it in a build with the `avx512` feature"
        );
        assert_eq!(
            hint(CPU_AVX512, CPU, CPU, false, false),
            "resume it in a build with the `avx512` feature"
        );
        assert!(hint(CPU_AVX512, CPU, CPU, true, false).contains("this CPU has no AVX-512F"));
        assert_eq!(
            hint(CPU, CPU_AVX512, CPU_AVX512, true, false),
            "resume it in a build without the `avx512` feature"
        );
        // A label no build of this toolkit gives any more (burn-ndarray's).
        assert!(hint("cpu (burn ndarray)", CPU, CPU, false, false).contains("no such backend"));
        assert!(hint("cuda (burn candle)", CUDA, CPU, false, true).contains("no such backend"));
    }
}
