//! The test runner (libtest-mimic): every integration test is a [`Trial`]; a test that needs
//! root is reported as *ignored* with its reason when not run as root (never as passed), and a
//! test may decide at run time that it cannot run by returning [`Skip`].

use std::future::Future;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Why a test could not run here (reported as ignored, with the reason).
#[derive(Debug)]
pub struct Skip(pub String);

/// What a test function may return.
pub trait Outcome {
    fn outcome(self) -> Result<Completion, Failed>;
}

impl Outcome for () {
    fn outcome(self) -> Result<Completion, Failed> {
        Ok(Completion::Completed)
    }
}

impl Outcome for Result<(), Skip> {
    fn outcome(self) -> Result<Completion, Failed> {
        match self {
            Ok(()) => Ok(Completion::Completed),
            Err(Skip(why)) => Ok(Completion::ignored_with(why)),
        }
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn name(module: &str, test: &str) -> String {
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    if module.is_empty() {
        test.to_owned()
    } else {
        format!("{module}::{test}")
    }
}

/// A test that runs anywhere.
pub fn any<O: Outcome + 'static>(module: &str, test: &str, f: fn() -> O) -> Trial {
    Trial::ignorable_test(name(module, test), move || f().outcome())
}

/// A test that needs root (namespaces, cgroups, eBPF, nftables): ignored otherwise.
pub fn root<O: Outcome + 'static>(module: &str, test: &str, f: fn() -> O) -> Trial {
    Trial::ignorable_test(name(module, test), move || {
        if !is_root() {
            return Ok(Completion::ignored_with(
                "needs root (network namespaces, cgroups, eBPF)",
            ));
        }
        f().outcome()
    })
}

/// An async test on a current-thread runtime that runs anywhere.
pub fn tokio<F: Future<Output = ()> + 'static>(module: &str, test: &str, f: fn() -> F) -> Trial {
    Trial::ignorable_test(name(module, test), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f());
        Ok(Completion::Completed)
    })
}

/// Runs `trials` with the command line's filters and exits with the result.
pub fn main(trials: Vec<Trial>) -> ! {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, trials).exit()
}

/// `tests![root a, any b, tokio c]` defines `pub fn tests() -> Vec<Trial>` for the module, each
/// function run as its kind ([`root`], [`any`], [`tokio`]). A test function not listed is dead
/// code, which the lints reject: nothing is silently left out.
#[macro_export]
macro_rules! tests {
    ($($kind:ident $name:ident),* $(,)?) => {
        pub fn tests() -> Vec<libtest_mimic::Trial> {
            vec![$($crate::common::harness::$kind(module_path!(), stringify!($name), $name)),*]
        }
    };
}
