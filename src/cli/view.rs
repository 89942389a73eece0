//! How the CLI shows a followed job: a progress bar on a terminal, one line per
//! status change otherwise.

use std::time::{Duration, Instant};

use contact_bulk_client::{status_label, Progress};
use contact_bulk_protocol::job::{JobKind, JobSnapshot};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A job's progress on stderr.
pub struct JobView {
    bar: ProgressBar,
    sized: bool,
    last_status: String,
    started: Instant,
}

impl JobView {
    /// A view drawing on stderr.
    pub fn stderr() -> JobView {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(spinner_style());
        bar.enable_steady_tick(Duration::from_millis(200));
        JobView {
            bar,
            sized: false,
            last_status: String::new(),
            started: Instant::now(),
        }
    }
}

/// The bar of a download of `len` bytes (when known) on stderr.
pub fn download_bar(len: Option<u64>) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "download [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} · {bytes_per_sec}",
    ) {
        bar.set_style(style);
    }
    bar
}

impl Progress for JobView {
    fn update(&mut self, snap: &JobSnapshot) {
        let status = status_label(snap);
        let total = snap.total.and_then(|t| u64::try_from(t).ok());
        if let (Some(total), false) = (total, self.sized) {
            self.bar.set_length(total);
            self.bar.set_style(bar_style());
            self.sized = true;
        }
        self.bar.set_position(processed(snap));
        let mut msg = status.clone();
        if snap.kind == JobKind::Delete {
            let c = &snap.counts;
            msg = format!(
                "{status} · {} contacts, {} conversations, {} messages",
                c.contacts, c.conversations, c.messages
            );
        }
        self.bar.set_message(msg);
        if status != self.last_status {
            if self.bar.is_hidden() {
                let total = total.map_or_else(|| "?".into(), |t| t.to_string());
                eprintln!(
                    "job {} {status}: {}/{total} after {:.1} s",
                    snap.job_id,
                    processed(snap),
                    self.started.elapsed().as_secs_f64()
                );
            }
            self.last_status = status;
        }
    }

    fn finish(&mut self, snap: &JobSnapshot) {
        self.bar.set_position(processed(snap));
        self.bar.abandon();
    }
}

fn processed(snap: &JobSnapshot) -> u64 {
    u64::try_from(snap.processed).unwrap_or(0)
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} processed · {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "[{elapsed_precise}] {wide_bar} {pos}/{len} · {per_sec} · eta {eta} · {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}
