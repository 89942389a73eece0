//! The Prometheus series of `metrics.rs`, checked in a process of their own:
//! the counters are process-wide, and the library's unit tests (supervisor,
//! delete, repositories) move them concurrently, so exact differences are only
//! exact here.

use std::time::Duration;

use contact_bulk_actors::metrics::*;
use contact_bulk_actors::model::{JobKind, JobRecord};
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
}

#[test]
fn series_are_named_as_the_contract_says_and_move() {
    let before = render();
    job_started();
    job_finished("export", "completed");
    let job = |kind, processed, contacts| {
        let mut j = JobRecord::new(
            kind,
            bson::oid::ObjectId::new(),
            None,
            None,
            contact_bulk_actors::filter::Filter::default(),
            None,
        );
        j.processed = processed;
        j.counts.contacts = contacts;
        j
    };
    checkpointed(&job(JobKind::Export, 10, 0), &job(JobKind::Export, 17, 0));
    // A delete starting over (counts back to zero) counts nothing.
    checkpointed(&job(JobKind::Delete, 5, 5), &job(JobKind::Delete, 0, 0));
    // A restore counts what it put back, not what it skipped.
    let before_restored = value(&render(), "bulk_contacts_restored_total");
    checkpointed(&job(JobKind::Restore, 0, 0), &job(JobKind::Restore, 9, 4));
    command_duration("bulk.v1.count", Duration::from_millis(3));
    webhook_delivery("success");
    let g = ws_connection();
    let after = render();
    assert_eq!(
        value(&after, "bulk_jobs_started_total") - value(&before, "bulk_jobs_started_total"),
        1.0
    );
    let done = "bulk_jobs_finished_total{kind=\"export\",status=\"completed\"}";
    assert_eq!(value(&after, done) - value(&before, done), 1.0);
    assert_eq!(
        value(&after, "bulk_rows_exported_total") - value(&before, "bulk_rows_exported_total"),
        7.0
    );
    assert_eq!(
        value(&after, "bulk_contacts_deleted_total"),
        value(&before, "bulk_contacts_deleted_total")
    );
    assert!(value(&after, "bulk_ws_connections") >= 1.0);
    assert_eq!(
        value(&after, "bulk_contacts_restored_total") - before_restored,
        4.0
    );
    assert!(
        after.contains(
            "bulk_command_duration_seconds_bucket{le=\"0.004\",subject=\"bulk.v1.count\"}"
        ) || after.contains(
            "bulk_command_duration_seconds_bucket{subject=\"bulk.v1.count\",le=\"0.004\"}"
        )
    );
    assert!(after.contains("bulk_webhook_deliveries_total{result=\"success\"}"));
    for name in [
        "bulk_jobs_running",
        "bulk_jobs_pending",
        "bulk_contacts_restored_total",
    ] {
        value(&after, name);
    }
    drop(g);
}
