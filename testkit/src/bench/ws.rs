//! `contact-bulk bench ws`: publish-to-frame latency of the WebSocket bridge of
//! the real service binary, with many clients subscribed to one job's events
//! (measured by [`super::ws_latency::bench_latency`]).

use bson::oid::ObjectId;
use clap::Args;
use serde_json::json;

use super::{mb, print_table, timed, Common, Harness};

/// Options of `bench ws`.
#[derive(Debug, Clone, Args)]
pub struct WsBench {
    /// WebSocket clients subscribed to the job.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Progress events published for the job.
    #[arg(long, default_value_t = 200)]
    pub events: usize,
    /// Scratch directory options.
    #[command(flatten)]
    pub common: Common,
}

/// Runs the WebSocket benchmark.
pub async fn run(args: WsBench) -> anyhow::Result<()> {
    let mut h = Harness::start(&args.common).await?;
    let service = h.service().await?;
    let org = ObjectId::new();
    let token = h.token(org, "jobs:read").await?;
    let nats_url = h.nats_server.url();
    let (measured, took) = timed(super::ws_latency::bench_latency(
        &nats_url,
        service.addr,
        org,
        &token,
        args.clients,
        args.events,
    ))
    .await;
    let mem = service.stop().await;
    let (p50, p99) = measured?;
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    println!();
    println!(
        "websocket benchmark: {} clients, {} events of one job",
        args.clients, args.events
    );
    print_table(
        &[
            "clients", "events", "p50 ms", "p99 ms", "seconds", "VmHWM MB",
        ],
        &[vec![
            args.clients.to_string(),
            args.events.to_string(),
            format!("{:.2}", ms(p50)),
            format!("{:.2}", ms(p99)),
            format!("{:.1}", took.as_secs_f64()),
            format!("{:.1}", mb(mem.hwm_kb)),
        ]],
    );
    println!(
        "{}",
        json!({
            "bench": "ws",
            "clients": args.clients,
            "events": args.events,
            "p50Ms": ms(p50),
            "p99Ms": ms(p99),
            "seconds": (took.as_secs_f64() * 1000.0).round() / 1000.0,
            "peakRssMb": (mb(mem.hwm_kb) * 1000.0).round() / 1000.0,
        })
    );
    drop(h);
    Ok(())
}
