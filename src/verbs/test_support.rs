//! The one place that decides what a test does when no RDMA device is present.

use super::device::{Context, find_device};
use super::error::VerbsError;

/// Environment variable naming the device tests use (default: the first device).
pub const ENV_DEVICE: &str = "RSMSG_DEVICE";
/// Environment variable that, set to `1`, turns a missing RDMA device into a test failure.
pub const ENV_REQUIRE: &str = "RSMSG_REQUIRE_RDMA";

/// Open the device for a test that needs RDMA.
///
/// Returns `None` after printing `skipped: no RDMA device (...)` to stderr when the host has no
/// RDMA device and `RSMSG_REQUIRE_RDMA` is not `1`; the caller then returns without asserting
/// (an explicit skip). `test` names the test in the message.
///
/// # Panics
/// When `RSMSG_REQUIRE_RDMA=1` and no device is found; when `RSMSG_DEVICE` names a device that
/// is not among those present; when a present device cannot be opened.
pub fn test_context(test: &str) -> Option<Context> {
    let required = std::env::var(ENV_REQUIRE).is_ok_and(|v| v == "1");
    let name = std::env::var(ENV_DEVICE).ok().filter(|s| !s.is_empty());
    let chain = |e: &VerbsError| match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    };
    match find_device(name.as_deref()) {
        Ok(dev) => match dev.open() {
            Ok(ctx) => Some(ctx),
            Err(e) => panic!(
                "{test}: RDMA device present but cannot be opened: {}",
                chain(&e)
            ),
        },
        Err(e @ (VerbsError::GetDeviceList(_) | VerbsError::NoDevice)) => {
            let why = chain(&e);
            if required {
                panic!("{test}: {ENV_REQUIRE}=1 but no RDMA device: {why}");
            }
            eprintln!(
                "{test}: skipped: no RDMA device ({why}); set {ENV_REQUIRE}=1 to fail instead"
            );
            None
        }
        Err(e) => panic!("{test}: {ENV_DEVICE}: {}", chain(&e)),
    }
}
