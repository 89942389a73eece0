//! contact-bulk: the service around the job actors: configuration, NATS intake,
//! event publishing, the HTTP API, the WebSocket bridge and the CLI.
//!
//! Library first: [`Service::start`] brings everything up and [`run`] serves
//! until the shutdown future resolves; `main` only parses the command line.

pub mod app;
pub mod auth;
pub mod config;
pub mod transport;

/// Process-wide Prometheus metrics (`contact_bulk_actors::metrics::webhook_delivery(..)` etc.).
pub use contact_bulk_actors::metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use contact_bulk_actors::artifact::Artifacts;
use contact_bulk_actors::job::JobEnv;
use contact_bulk_actors::repo::{JobRepo, MongoJobs};
use contact_bulk_actors::supervisor::{Supervisor, SupervisorCounters, SupervisorMsg};
use ractor::{Actor, ActorRef};
use tokio::task::JoinSet;

use crate::app::App;
use crate::app::{quota, webhooks};
use crate::auth::Keys;
use crate::config::Config;
use crate::transport::nats::events::NatsSink;
use crate::transport::nats::{events, intake};
use crate::transport::{http, ws};

/// A running service instance.
pub struct Service {
    /// Where HTTP listens (the real port when `HTTP_ADDR` asked for port 0).
    pub addr: SocketAddr,
    /// Shared handles (tests use them to look inside).
    pub app: Arc<App>,
    supervisor_handle: tokio::task::JoinHandle<()>,
    tasks: JoinSet<()>,
    discovery: Option<async_nats::service::Service>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Connects to MongoDB and NATS, ensures indexes and streams, starts the
    /// supervisor (which resumes unfinished jobs), the NATS intake and HTTP.
    /// Logs `listening on http://ADDR` once all of that is ready.
    pub async fn start(config: Config) -> anyhow::Result<Service> {
        let secret = config.secret()?.to_string();
        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        let addr = listener.local_addr()?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let keys = Keys::new(&secret, &public_url);

        let mut options = mongodb::options::ClientOptions::parse(&config.mongodb_uri)
            .await
            .context("parsing MONGODB_URI")?;
        if options.write_concern.is_none() {
            // A job record or checkpoint acknowledged is one a server crash keeps.
            options.write_concern = Some(
                mongodb::options::WriteConcern::builder()
                    .journal(true)
                    .build(),
            );
        }
        let mongo = mongodb::Client::with_options(options).context("connecting to mongodb")?;
        let db = mongo.database(&config.mongodb_db);
        let nats = async_nats::ConnectOptions::new()
            .name("contact-bulk")
            .retry_on_initial_connect()
            .connect(config.nats_servers()?)
            .await
            .context("connecting to nats")?;
        let js = async_nats::jetstream::new(nats.clone());
        // Retried for up to 30 s: a cluster may still be electing its leaders.
        events::ensure_streams(&js, &config).await?;

        contact_bulk_actors::store::ensure_indexes(&db)
            .await
            .context("ensuring indexes")?;
        let store: Arc<dyn JobRepo> =
            Arc::new(MongoJobs::new(&db).with_clock_offset(config.test_clock_offset_ms));
        store
            .sync_clock()
            .await
            .context("reading the database's clock")?;
        let artifacts: Arc<dyn contact_bulk_actors::repo::ChunkRepo> =
            Arc::new(Artifacts::new(&db));
        let webhooks = webhooks::Webhooks::new(
            Arc::new(contact_bulk_actors::repo::MongoWebhooks::new(&db)),
            store.clone(),
            &config.webhooks,
            keys.clone(),
        );
        webhooks
            .ensure_indexes()
            .await
            .context("ensuring webhook indexes")?;
        let sink: Arc<dyn contact_bulk_actors::events::EventSink> = Arc::new(NatsSink::new(
            js.clone(),
            keys.clone(),
            &config.subject_prefix,
        ));
        let env = JobEnv {
            jobs: store.clone(),
            crm: contact_bulk_actors::repo::Crm::of(Arc::new(
                contact_bulk_actors::repo::MongoCrm::new(&db),
            )),
            export: Arc::new(contact_bulk_actors::repo::MongoExport::new(&db)),
            artifacts: artifacts.clone(),
            sink: sink.clone(),
            settings: config.job_settings(),
            instance: uuid::Uuid::new_v4().to_string(),
        };
        // The lease owner id of this process: operators (and the chaos test)
        // find which instance holds a job from its record's `leaseOwner`.
        tracing::info!(instance = %env.instance, pid = std::process::id(), "instance id");
        let (supervisor, supervisor_handle) =
            Actor::spawn(None, Supervisor::new(), (env, config.caps())).await?;

        let mut tasks = JoinSet::new();
        let hub = ws::Hub::start(js.clone(), &config, &mut tasks).await?;
        let quota = quota::Quota::new(
            Arc::new(contact_bulk_actors::repo::MongoQuota::new(&db)),
            store.clone(),
            config.rate_per_min,
            config.max_pending_per_org,
        );
        let reads = Arc::new(contact_bulk_actors::repo::MongoReads::new(&db));
        let app = Arc::new(App {
            reads,
            restore: Arc::new(contact_bulk_actors::repo::MongoCrm::new(&db)),
            names: Arc::new(contact_bulk_actors::repo::MongoExport::new(&db)),
            store,
            artifacts,
            supervisor,
            keys,
            nats,
            cancel_subject: config.subjects().internal_cancel(),
            sink,
            quota,
            retention: app::retention::Retention::from_config(&config),
            webhooks: webhooks.clone(),
        });
        let discovery = intake::start(app.clone(), &config, &mut tasks).await?;
        app::sweeper::start(app.clone(), config.retention_sweep, &mut tasks);
        webhooks.start(&js, &config, &mut tasks).await?;
        let bridge = ws::Bridge {
            app: app.clone(),
            hub,
        };
        let router = http::router(app.clone(), &config, ws::routes(bridge)).await?;
        let (http_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!("listening on http://{addr}");
        Ok(Service {
            addr,
            app,
            supervisor_handle,
            tasks,
            discovery: Some(discovery),
            http_stop: Some(http_stop),
            http,
        })
    }

    /// The supervisor.
    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.app.supervisor
    }

    /// The supervisor's counters.
    pub async fn counters(&self) -> anyhow::Result<SupervisorCounters> {
        Ok(ractor::call!(self.app.supervisor, SupervisorMsg::Counters)?)
    }

    /// Drains: running jobs stop at a batch boundary and stay resumable; then
    /// intake and HTTP stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.tasks.abort_all();
        if let Some(discovery) = self.discovery.take() {
            // This instance stops answering `$SRV.PING/INFO/STATS`.
            let _ = discovery.stop().await;
        }
        let drained = ractor::call_t!(self.app.supervisor, SupervisorMsg::Drain, 15_000);
        if let Err(e) = drained {
            tracing::warn!(error = %e, "jobs did not drain in time");
        }
        self.app.supervisor.stop(None);
        let _ = self.supervisor_handle.await;
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.http).await;
        let _ = self.app.nats.flush().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Serves until `shutdown` resolves, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let service = Service::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: draining jobs");
    service.stop().await
}
