//! The clean-up a job that failed for good owes (a delete's undeleted contacts
//! given back with their children, a restore's undecided ones, an export's
//! partial file): owed in the job record from the write that fails the job,
//! claimed by one instance at a time, so a clean-up that an instance's death
//! or an outage interrupted is redone by a later scan (of any instance).

use crate::error::JobError;
use crate::job::JobEnv;
use crate::kinds::JobKinds;
use crate::model::JobRecord;

/// Owed clean-ups done per scan at most (each is bounded: a few batches).
const PER_SCAN: usize = 8;

/// Claims and does the clean-up owed by `job_id`, or by the job that failed
/// first when `None`. `Ok(None)`: nothing owed, or another instance holds it.
pub(super) async fn clean_up(
    env: &JobEnv,
    kinds: &dyn JobKinds,
    job_id: Option<&str>,
) -> Result<Option<JobRecord>, JobError> {
    let claimed = env
        .jobs
        .claim_cleanup(job_id, &env.instance, env.settings.lease_ttl)
        .await?;
    let Some(job) = claimed else {
        return Ok(None);
    };
    if crate::failpoint::fires(crate::failpoint::CLEANUP_FAILS, &job.org_id.to_hex()) {
        return Err(JobError::Unavailable {
            service: crate::error::Dependency::Mongodb,
            message: "clean-up failed at a failure point".into(),
        });
    }
    // Each clean-up is idempotent (a give-back redone puts nothing back
    // twice), so one interrupted anywhere is simply done again.
    kinds.abandon(env, &job).await?;
    env.jobs.cleaned(&job.job_id, &env.instance).await?;
    Ok(Some(job))
}

/// Does the clean-ups still owed (their instance died or met an outage
/// before finishing them), oldest first.
pub(super) async fn sweep(env: &JobEnv, kinds: &dyn JobKinds) {
    for _ in 0..PER_SCAN {
        match clean_up(env, kinds, None).await {
            Ok(Some(job)) => tracing::info!(job_id = %job.job_id, "owed clean-up done"),
            Ok(None) => break,
            Err(e) => {
                // Its claim runs out and a later scan tries again.
                tracing::warn!(error = %e, "owed clean-up failed");
                break;
            }
        }
    }
}
