//! How the CLI shows a followed job: a progress bar on a terminal, one line per
//! status change otherwise.

use std::time::{Duration, Instant};

use contact_bulk_client::{counts, processed, status_label, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

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
    fn update(&mut self, snap: &Value) {
        let status = status_label(snap);
        if let (Some(total), false) = (snap["total"].as_u64(), self.sized) {
            self.bar.set_length(total);
            self.bar.set_style(bar_style());
            self.sized = true;
        }
        self.bar.set_position(processed(snap));
        let mut msg = status.clone();
        if snap["kind"] == "delete" {
            let (c, v, m) = counts(snap);
            msg = format!("{status} · {c} contacts, {v} conversations, {m} messages");
        }
        self.bar.set_message(msg);
        if status != self.last_status {
            if self.bar.is_hidden() {
                let total = snap["total"]
                    .as_u64()
                    .map_or_else(|| "?".into(), |t| t.to_string());
                eprintln!(
                    "job {} {status}: {}/{total} after {:.1} s",
                    snap["jobId"].as_str().unwrap_or("?"),
                    processed(snap),
                    self.started.elapsed().as_secs_f64()
                );
            }
            self.last_status = status;
        }
    }

    fn finish(&mut self, snap: &Value) {
        self.bar.set_position(processed(snap));
        self.bar.abandon();
    }
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
