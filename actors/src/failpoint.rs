//! Crash points for tests of the real binary: with `BULK_FAILPOINT=<name>` in
//! its environment, the process aborts (as a SIGKILL would end it: no drain,
//! no lease release) the first time it reaches the point of that name.
//! Without the variable a point costs one cached comparison.

use std::sync::OnceLock;

/// Aborts the process if `BULK_FAILPOINT` names this point.
pub fn hit(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("BULK_FAILPOINT")
            .ok()
            .filter(|v| !v.is_empty())
    });
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint reached: aborting");
        std::process::abort();
    }
}
