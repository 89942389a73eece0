//! Failure points for tests, of two kinds:
//! - crash points of the real binary ([`hit`]): with `BULK_FAILPOINT=<name>` in
//!   its environment, the process aborts (as a SIGKILL would end it: no drain,
//!   no lease release) the first time it reaches the point of that name;
//!   without the variable a point costs one cached comparison;
//! - in-process points ([`fires`]): a point armed for a scope (an
//!   organisation) fires a given number of times, making the code at that
//!   point fail the way a fault would (e.g. a write that was applied but whose
//!   reply was lost). Unarmed, it costs one relaxed atomic load. Nothing in the
//!   service arms them; tests do, through [`arm`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

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

static ANY: AtomicBool = AtomicBool::new(false);
static ARMED: Mutex<Option<HashMap<(String, String), u32>>> = Mutex::new(None);

/// After the job's delete batch record was written: its reply is lost.
pub const DELETE_RECORD_LOST_REPLY: &str = "delete.record.lost_reply";
/// After the job's terminal write: its reply is lost.
pub const FINISH_LOST_REPLY: &str = "job.finish.lost_reply";
/// A delete step that prepared a batch (its audit entries written) then fails
/// on its own work before recording it.
pub const DELETE_STEP_FAILS: &str = "delete.step.fails";
/// A restore batch that put its contacts back then fails on its own work
/// before their children.
pub const RESTORE_CHILDREN_FAILS: &str = "restore.children.fails";
/// A delete batch whose keep deleted its children then fails on its own work
/// before deleting its contacts.
pub const DELETE_AFTER_KEEP_FAILS: &str = "delete.after_keep.fails";
/// The clean-up of a job that failed for good meets an outage (scope: the
/// job's organisation).
pub const CLEANUP_FAILS: &str = "cleanup.fails";
/// An export step that wrote rows then fails on its own work.
pub const EXPORT_STEP_FAILS: &str = "export.step.fails";

/// Arms `point` for `scope` to fire `times` times (tests only).
pub fn arm(point: &str, scope: &str, times: u32) {
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    armed
        .get_or_insert_with(HashMap::new)
        .insert((point.to_string(), scope.to_string()), times);
    ANY.store(true, Ordering::Release);
}

/// How often `point` may still fire for `scope`.
pub fn remaining(point: &str, scope: &str) -> u32 {
    let armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    armed
        .as_ref()
        .and_then(|m| m.get(&(point.to_string(), scope.to_string())).copied())
        .unwrap_or(0)
}

/// True when `point` is armed for `scope` (and counts the firing).
pub fn fires(point: &str, scope: &str) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
    let Some(left) = armed
        .as_mut()
        .and_then(|m| m.get_mut(&(point.to_string(), scope.to_string())))
    else {
        return false;
    };
    if *left == 0 {
        return false;
    }
    *left -= 1;
    tracing::warn!(point, scope, "failure point fired");
    true
}

/// Where a delete's keep has read a slice's children and not yet counted
/// them again (the moment a child written meanwhile must be caught).
pub const KEEP_AFTER_READ: &str = "keep.after_read";

type Pauses = HashMap<(String, String), std::sync::Arc<PausePoint>>;
static PAUSES: Mutex<Option<Pauses>> = Mutex::new(None);
static ANY_PAUSE: AtomicBool = AtomicBool::new(false);

/// Both sides of a pause point.
#[derive(Debug, Default)]
pub struct PausePoint {
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl PausePoint {
    /// Waits until the code has stopped at the point.
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets the code go on.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

/// Arms a pause at `point` for `scope` (tests only): the next time the code
/// reaches it, it stops there until [`PausePoint::release`]; once.
pub fn pause_at(point: &str, scope: &str) -> std::sync::Arc<PausePoint> {
    let pause = std::sync::Arc::new(PausePoint::default());
    let mut pauses = PAUSES.lock().unwrap_or_else(|e| e.into_inner());
    pauses
        .get_or_insert_with(HashMap::new)
        .insert((point.to_string(), scope.to_string()), pause.clone());
    ANY_PAUSE.store(true, Ordering::Release);
    pause
}

/// Stops here while a test holds the pause armed for `point` and `scope`;
/// unarmed, one relaxed atomic load.
pub async fn pause(point: &str, scope: &str) {
    if !ANY_PAUSE.load(Ordering::Acquire) {
        return;
    }
    let armed = {
        let mut pauses = PAUSES.lock().unwrap_or_else(|e| e.into_inner());
        pauses
            .as_mut()
            .and_then(|m| m.remove(&(point.to_string(), scope.to_string())))
    };
    if let Some(p) = armed {
        tracing::warn!(point, scope, "pause point reached");
        p.reached.notify_one();
        p.release.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_as_often_as_armed_and_only_in_its_scope() {
        assert!(!fires("t.point", "a"));
        arm("t.point", "a", 2);
        assert!(!fires("t.point", "b"));
        assert!(fires("t.point", "a"));
        assert_eq!(remaining("t.point", "a"), 1);
        assert!(fires("t.point", "a"));
        assert!(!fires("t.point", "a"));
    }
}
