//! The command line: `serve`, `dev`, `token`, the operator commands (`export`,
//! `delete`, `watch`, `cancel`, over NATS) and the benchmarks (`bench`).

pub mod operator;
pub mod view;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use contact_bulk::auth::Keys;
use contact_bulk::config::Config;

/// contact-bulk: bulk export and cascade delete jobs for a CRM.
#[derive(Debug, Parser)]
#[command(name = "contact-bulk", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (configuration from the environment).
    Serve(Config),
    /// Zero-configuration stack: starts nats-server and the MongoDB-wire server
    /// under ./.data, seeds a demo organisation, serves, prints the page and a token.
    Dev(DevArgs),
    /// Mint a bearer token (for development and operators).
    Token(TokenArgs),
    /// Export contacts through the service: job, progress, download, sha256 check.
    Export(operator::ExportArgs),
    /// Cascade-delete contacts through the service: dry run, confirmation, progress.
    Delete(operator::DeleteArgs),
    /// Undo an ended delete: impact, confirmation, progress.
    Restore(operator::RestoreArgs),
    /// Show an existing job's progress until it ends, then its snapshot.
    Watch(operator::JobArgs),
    /// Cancel a job (it stops at its next batch boundary).
    Cancel(operator::JobArgs),
    /// Benchmarks against the real service binary with their own servers.
    Bench(contact_bulk_testkit::bench::BenchArgs),
}

/// Options of `dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Data directory of the child servers.
    #[arg(long, default_value = ".data")]
    pub data_dir: PathBuf,
    /// HTTP address.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: std::net::SocketAddr,
    /// Contacts in the demo organisation (when the database is empty).
    #[arg(long, default_value_t = 20_000)]
    pub demo_contacts: u64,
}

/// Options of `token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Organisation id (24-hex).
    #[arg(long)]
    pub org: String,
    /// User id (24-hex).
    #[arg(long, default_value = "000000000000000000000001")]
    pub user: String,
    /// Space-separated scopes.
    #[arg(long, default_value = "contacts:export contacts:delete jobs:read")]
    pub scope: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: i64,
    /// Signing secret.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: String,
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the parsed command line.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => contact_bulk::run(config, shutdown_signal()).await,
        Command::Dev(args) => dev(args).await,
        Command::Token(t) => {
            let keys = Keys::new(&t.secret, "");
            println!("{}", keys.mint(&t.user, &t.org, &t.scope, t.ttl)?);
            Ok(())
        }
        Command::Export(a) => operator::export(a).await,
        Command::Delete(a) => operator::delete(a).await,
        Command::Restore(a) => operator::restore(a).await,
        Command::Watch(a) => operator::watch(a).await,
        Command::Cancel(a) => operator::cancel(a).await,
        Command::Bench(a) => contact_bulk_testkit::bench::main(a).await,
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    use contact_bulk_testkit::servers::{repo_nats_conf, MongoServer, NatsServer};
    let data = std::path::absolute(&args.data_dir)?;
    std::fs::create_dir_all(data.join("nats"))?;
    std::fs::create_dir_all(data.join("mongo"))?;
    let nats = NatsServer::start(&repo_nats_conf(), &data.join("nats"), None).await?;
    let mongo = MongoServer::start(&data.join("mongo"), None).await?;
    let secret_file = data.join("jwt_secret");
    let secret = match std::fs::read_to_string(&secret_file) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            let s = format!("{:032x}", rand::random::<u128>());
            std::fs::write(&secret_file, &s)?;
            s
        }
    };
    let mut config = Config::from_env();
    config.nats_url = nats.url();
    config.mongodb_uri = mongo.uri();
    config.http_addr = args.http_addr;
    config.jwt_secret = Some(secret.clone());
    let client = mongodb::Client::with_uri_str(&config.mongodb_uri).await?;
    let db = client.database(&config.mongodb_db);
    let spec = contact_bulk_testkit::seed::SeedSpec {
        contacts: args.demo_contacts,
        ..contact_bulk_testkit::seed::SeedSpec::demo()
    };
    let org = match contact_bulk_testkit::seed::seed_demo_if_empty_with(&db, &spec).await? {
        Some(org) => {
            println!(
                "seeded demo organisation {} ({} contacts)",
                org.org_id.to_hex(),
                spec.contacts
            );
            org.org_id
        }
        None => contact_bulk_testkit::seed::first_org(&db)
            .await?
            .ok_or_else(|| anyhow::anyhow!("database has contacts but no organisation"))?,
    };
    let service = contact_bulk::Service::start(config).await?;
    let user = contact_bulk_testkit::seed::first_user(&db, org)
        .await?
        .map(|u| u.to_hex());
    let user = user.unwrap_or_else(|| "000000000000000000000001".into());
    let token = Keys::new(&secret, "").mint(
        &user,
        &org.to_hex(),
        "contacts:export contacts:delete jobs:read",
        86_400,
    )?;
    println!();
    println!("contact-bulk dev stack is up");
    println!("  nats:     {}", nats.url());
    println!("  mongodb:  {}", mongo.uri());
    println!("  web page: http://{}/#token={token}", service.addr);
    println!("  token:    {token}");
    println!("  org:      {}", org.to_hex());
    println!("press Ctrl-C to stop");
    shutdown_signal().await;
    service.stop().await?;
    drop(mongo);
    drop(nats);
    Ok(())
}
