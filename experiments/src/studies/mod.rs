//! One module per study.

pub mod lmc;
pub mod lmc_llama;
pub mod many;
pub mod merge_llm;
pub mod merging;
pub mod moe;
pub mod pleas;
pub mod pleas_cnn;
pub mod pleas_llama;
pub mod rws;
pub mod s2ft;
pub mod s2ft_llm;
pub mod spectra;
pub mod svd_align;

/// Refuses the first option of `given` that was set, as `"{flag} {why}"`
/// (options that belong to another mode of the study).
pub(crate) fn refuse_given(given: &[(&str, bool)], why: &str) -> anyhow::Result<()> {
    match given.iter().find(|(_, set)| *set) {
        Some((flag, _)) => anyhow::bail!("{flag} {why}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    /// The options an empty command line gives.
    fn parsed<T: clap::Args>() -> T {
        #[derive(clap::Parser)]
        struct Wrap<T: clap::Args> {
            #[command(flatten)]
            args: T,
        }
        <Wrap<T> as clap::Parser>::parse_from(["study"]).args
    }

    /// Each options struct's `Default` is what the command line gives when
    /// no option is passed, so tests and library users start from the
    /// defaults the README documents.
    #[test]
    fn defaults_are_the_command_lines() {
        fn same<T: clap::Args + Default + std::fmt::Debug>() {
            let (d, p) = (
                format!("{:?}", T::default()),
                format!("{:?}", parsed::<T>()),
            );
            assert_eq!(d, p, "{}", std::any::type_name::<T>());
        }
        same::<crate::report::RunArgs>();
        same::<super::lmc::LmcArgs>();
        same::<super::many::ManyArgs>();
        same::<super::svd_align::SvdAlignArgs>();
        same::<super::s2ft::LmArgs>();
        same::<super::s2ft::S2ftArgs>();
        same::<super::merging::MergeArgs>();
        same::<super::moe::MoeArgs>();
        same::<super::pleas::PleasArgs>();
        same::<super::rws::RwsArgs>();
    }
}
