//! The job snapshot callers see: the job core's snapshot of a record, with a
//! fresh signed download link for a finished export. Used by the use cases,
//! the webhooks and the NATS event sink alike.

use contact_bulk_actors::model::{JobRecord, JobSnapshot};

use crate::auth::Keys;

/// The snapshot with a fresh signed link when the export is complete (and
/// its file not expired: no link is minted for data that is gone).
pub fn decorate(keys: &Keys, job: &JobRecord) -> JobSnapshot {
    let mut snap = job.snapshot();
    if let Some(result) = snap
        .result
        .as_mut()
        .and_then(|r| r.export_mut())
        .filter(|r| !r.expired)
    {
        let (url, expires) = keys.download_link(&job.job_id);
        result.download_url = Some(url);
        result.expires_at = chrono::DateTime::from_timestamp(expires, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    snap
}
