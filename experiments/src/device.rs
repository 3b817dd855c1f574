//! `--device cpu|cuda`: which Burn backend a study trains on.

/// A study's device choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Burn's ndarray backend.
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

    /// The label the report records.
    pub fn label(self) -> &'static str {
        match self {
            Device::Cpu => "cpu (burn ndarray)",
            Device::Cuda => "cuda (burn cubecl)",
        }
    }
}
