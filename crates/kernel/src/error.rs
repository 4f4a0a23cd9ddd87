//! The kernel crate's error: what was being done, and the system's answer.

/// An operation on the kernel that failed: loading (with the verifier's log), pinning,
/// attaching, reading or writing a map, a test run.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct KernelError {
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl KernelError {
    fn render(&self) -> String {
        let source = self.source.to_string();
        if source == "refused" { self.what.clone() } else { format!("{}: {source}", self.what) }
    }

    pub fn new(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self { what: what.into(), source: source.into() }
    }

    /// An error that is only a message (no underlying system error).
    pub fn msg(what: impl Into<String>) -> Self {
        Self { what: what.into(), source: "refused".into() }
    }

    /// Whether the kernel refused for lack of privileges (EPERM/EACCES anywhere in the chain).
    pub fn is_permission_denied(&self) -> bool {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(self.source.as_ref());
        while let Some(err) = e {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::PermissionDenied
            {
                return true;
            }
            if err.to_string().contains("Permission denied") || err.to_string().contains("Operation not permitted") {
                return true;
            }
            e = err.source();
        }
        false
    }
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// `.kctx("what")` on any fallible result: the kernel crate's `anyhow::Context`.
pub(crate) trait KernelContext<T> {
    fn kctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> KernelContext<T> for std::result::Result<T, E> {
    fn kctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| KernelError::new(what(), e))
    }
}

/// Returns a [`KernelError`] with a plain message.
macro_rules! kbail {
    ($($t:tt)*) => { return Err($crate::error::KernelError::msg(format!($($t)*))) };
}
pub(crate) use kbail;

/// The aya and system errors a bare `?` meets, each named by what failed.
macro_rules! from_errors {
    ($($ty:ty => $what:literal),* $(,)?) => {$(
        impl From<$ty> for KernelError {
            fn from(e: $ty) -> Self {
                Self::new($what, e)
            }
        }
    )*};
}
from_errors! {
    aya::maps::MapError => "BPF map operation",
    aya::programs::ProgramError => "BPF program operation",
    aya::programs::links::LinkError => "BPF link operation",
    aya::pin::PinError => "pinning",
    aya::EbpfError => "loading the XDP object",
    std::io::Error => "system call",
    std::ffi::NulError => "interface name",
}
