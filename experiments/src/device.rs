//! `--device cpu|cuda`: which Burn backend a study trains on.

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
            Device::Cpu if avx512_matmul() => "cpu (burn flex, AVX-512 matmul)",
            Device::Cpu => "cpu (burn flex)",
            Device::Cuda => "cuda (burn cubecl)",
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
