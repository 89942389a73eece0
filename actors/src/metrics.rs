//! Process-wide Prometheus metrics (contract section 13): typed handles in one
//! registry, bumped through the small functions below from the job core, the
//! intake, the WebSocket bridge and the webhook worker; `GET /metrics` renders them.
//!
//! Every bump is an atomic add on a handle (labelled families: one read-locked
//! map lookup), made once per batch or per request, never per row.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::model::{JobKind, JobRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Finished {
    kind: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Delivery {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Subject {
    subject: String,
}

type Durations = Family<Subject, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    started: Counter,
    finished: Family<Finished, Counter>,
    running: Gauge,
    pending: Gauge,
    rows_exported: Counter,
    contacts_deleted: Counter,
    contacts_restored: Counter,
    ws_connections: Gauge,
    webhook_deliveries: Family<Delivery, Counter>,
    command_duration: Durations,
    quota_rejections: Counter,
    exports_expired: Counter,
    jobs_removed: Counter,
}

fn command_histogram() -> Histogram {
    // 1 ms .. ~33 s: counts answer in milliseconds, a dry run over a large
    // organisation in seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let m = Metrics {
        started: Counter::default(),
        finished: Family::default(),
        running: Gauge::default(),
        pending: Gauge::default(),
        rows_exported: Counter::default(),
        contacts_deleted: Counter::default(),
        contacts_restored: Counter::default(),
        ws_connections: Gauge::default(),
        webhook_deliveries: Family::default(),
        command_duration: Family::new_with_constructor(command_histogram as fn() -> Histogram),
        quota_rejections: Counter::default(),
        exports_expired: Counter::default(),
        jobs_removed: Counter::default(),
        registry: Registry::default(),
    };
    // Counters get their `_total` suffix from the encoder.
    registry.register(
        "bulk_jobs_started",
        "Jobs created by this process (exports, deletes, restores; replays not counted)",
        m.started.clone(),
    );
    registry.register(
        "bulk_jobs_finished",
        "Jobs this process moved to a terminal status, by kind and status",
        m.finished.clone(),
    );
    registry.register(
        "bulk_jobs_running",
        "Job actors running in this process",
        m.running.clone(),
    );
    registry.register(
        "bulk_jobs_pending",
        "Jobs waiting to start, across all instances (read from MongoDB at scrape time)",
        m.pending.clone(),
    );
    registry.register(
        "bulk_rows_exported",
        "Rows written to export files by this process",
        m.rows_exported.clone(),
    );
    registry.register(
        "bulk_contacts_deleted",
        "Contacts deleted by delete jobs in this process",
        m.contacts_deleted.clone(),
    );
    registry.register(
        "bulk_contacts_restored",
        "Contacts put back by restore jobs in this process",
        m.contacts_restored.clone(),
    );
    registry.register(
        "bulk_ws_connections",
        "WebSocket clients connected to this process",
        m.ws_connections.clone(),
    );
    registry.register(
        "bulk_webhook_deliveries",
        "Webhook delivery attempts by result",
        m.webhook_deliveries.clone(),
    );
    registry.register(
        "bulk_command_duration_seconds",
        "Time to answer a NATS command, by subject",
        m.command_duration.clone(),
    );
    registry.register(
        "bulk_quota_rejections",
        "Job-starting requests refused with rate_limited",
        m.quota_rejections.clone(),
    );
    registry.register(
        "bulk_exports_expired",
        "Export files removed after BULK_EXPORT_RETENTION",
        m.exports_expired.clone(),
    );
    registry.register(
        "bulk_jobs_removed",
        "Ended job records removed after BULK_JOB_RETENTION",
        m.jobs_removed.clone(),
    );
    Metrics { registry, ..m }
});

/// A job was created (not a `commandId` replay).
pub fn job_started() {
    METRICS.started.inc();
}

/// A job reached `status` (`completed`, `failed`, `cancelled`); `kind` is
/// `export`, `delete` or `restore`.
pub fn job_finished(kind: &str, status: &str) {
    METRICS
        .finished
        .get_or_create(&Finished {
            kind: kind.to_string(),
            status: status.to_string(),
        })
        .inc();
}

/// A job actor started running here.
pub fn job_running_started() {
    METRICS.running.inc();
}

/// A job actor stopped running here (ended, failed, drained).
pub fn job_running_stopped() {
    METRICS.running.dec();
}

/// Jobs waiting to start (set from a database count when scraped).
pub fn set_jobs_pending(n: i64) {
    METRICS.pending.set(n);
}

/// `n` more rows are in export files.
pub fn rows_exported(n: u64) {
    METRICS.rows_exported.inc_by(n);
}

/// `n` more contacts deleted.
pub fn contacts_deleted(n: u64) {
    METRICS.contacts_deleted.inc_by(n);
}

/// `n` more contacts restored.
pub fn contacts_restored(n: u64) {
    METRICS.contacts_restored.inc_by(n);
}

/// Counts a WebSocket connection for as long as the guard lives.
#[must_use = "the connection is counted while the guard lives"]
pub fn ws_connection() -> WsConnection {
    METRICS.ws_connections.inc();
    WsConnection(())
}

/// Held by a WebSocket session; dropping it uncounts the connection.
#[derive(Debug)]
pub struct WsConnection(());

impl Drop for WsConnection {
    fn drop(&mut self) {
        METRICS.ws_connections.dec();
    }
}

/// One webhook delivery attempt ended with `result`: `success` (a 2xx),
/// `failure` (any other answer, a timeout, a refused connection; retried) or
/// `gave_up` (failed, and the 24-hour retry window is over).
pub fn webhook_delivery(result: &str) {
    METRICS
        .webhook_deliveries
        .get_or_create(&Delivery {
            result: result.to_string(),
        })
        .inc();
}

/// A command on `subject` (e.g. `bulk.v1.export`) was answered after `took`.
pub fn command_duration(subject: &str, took: Duration) {
    METRICS
        .command_duration
        .get_or_create(&Subject {
            subject: subject.to_string(),
        })
        .observe(took.as_secs_f64());
}

/// Makes the duration series of `subject` exist (at zero) before its first command.
pub fn command_subject(subject: &str) {
    let _ = METRICS.command_duration.get_or_create(&Subject {
        subject: subject.to_string(),
    });
}

/// A request was refused with `rate_limited`.
pub fn quota_rejected() {
    METRICS.quota_rejections.inc();
}

/// `n` export files expired.
pub fn exports_expired(n: u64) {
    METRICS.exports_expired.inc_by(n);
}

/// `n` ended job records removed.
pub fn jobs_removed(n: u64) {
    METRICS.jobs_removed.inc_by(n);
}

/// A held job's record went from `before` to `after` in a checkpoint: the
/// work done in between is counted as rows exported (an export's `processed`),
/// contacts deleted or restored (the job's `counts.contacts`, which leaves out
/// the contacts a restore skipped).
pub fn checkpointed(before: &JobRecord, after: &JobRecord) {
    let (was, now) = match after.kind {
        JobKind::Export => (
            before.processed.max(0) as u64,
            after.processed.max(0) as u64,
        ),
        _ => (before.counts.contacts, after.counts.contacts),
    };
    // A reset (a job starting over) is not work undone.
    let Some(n) = now.checked_sub(was).filter(|n| *n > 0) else {
        return;
    };
    match after.kind {
        JobKind::Export => rows_exported(n),
        JobKind::Delete => contacts_deleted(n),
        JobKind::Restore => contacts_restored(n),
    }
}

/// Every metric in the text exposition format (OpenMetrics 1.0, which the
/// Prometheus text parser also reads).
pub fn render() -> String {
    let m = &*METRICS;
    // Series that exist from the start, so dashboards see zeros, not gaps.
    for kind in ["export", "delete", "restore"] {
        for status in ["completed", "failed", "cancelled"] {
            let _ = m.finished.get_or_create(&Finished {
                kind: kind.to_string(),
                status: status.to_string(),
            });
        }
    }
    for result in ["success", "failure", "gave_up"] {
        let _ = m.webhook_deliveries.get_or_create(&Delivery {
            result: result.to_string(),
        });
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        tracing::warn!(error = %e, "metrics not encoded");
    }
    out
}
