//! The `X-RateLimit-*` and `Retry-After` headers of the job-starting endpoints
//! (contract section 10): the quota decision made while a request was handled
//! (see [`crate::app::quota::RateSlot`]) is written onto its response, success or 429.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::app::quota::{RateInfo, RateSlot};

/// Middleware: runs the request with a fresh slot and copies what it holds into headers.
pub async fn headers(req: Request, next: Next) -> Response {
    let (mut resp, info) = RateSlot::scope(next.run(req)).await;
    if let Some(info) = info {
        write(resp.headers_mut(), &info);
    }
    resp
}

fn write(h: &mut HeaderMap, info: &RateInfo) {
    let mut set = |name: &'static str, v: u64| {
        h.insert(HeaderName::from_static(name), HeaderValue::from(v));
    };
    if info.limit > 0 {
        set("x-ratelimit-limit", u64::from(info.limit));
        set("x-ratelimit-remaining", u64::from(info.remaining));
        set("x-ratelimit-reset", info.reset_secs);
    }
    if let Some(ms) = info.retry_after_ms {
        // Whole seconds, rounded up: retrying on time must not be refused again.
        set("retry-after", ms.div_ceil(1000).max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_retry_after_in_whole_seconds() {
        let mut h = HeaderMap::new();
        write(
            &mut h,
            &RateInfo {
                limit: 30,
                remaining: 0,
                reset_secs: 12,
                retry_after_ms: Some(11_001),
            },
        );
        assert_eq!(h["retry-after"], "12");
        assert_eq!(h["x-ratelimit-limit"], "30");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "12");
    }
}
