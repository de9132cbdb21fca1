//! `sinter-edge`: the client of a federation (`sinter fl client`) as a binary
//! of its own, for sites and devices that only ever train locally and send
//! updates. It links only what a client runs (the `fl` engines, the wire
//! protocol, the models, the text and IDX readers), not the parameter
//! servers, the simulator, the launcher or Parquet, and builds statically:
//! `cargo build --release -p edge --target x86_64-unknown-linux-musl`.
//!
//! Exit codes are `sinter`'s: 0 done, 2 a usage or config error, 3 the
//! server could not be reached (or refused the client) by the deadline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use node::config::JobConfig;
use node::error::exit;
use node::fl::client::ClientOptions;

#[derive(Parser)]
#[command(
    name = "sinter-edge",
    version,
    about = "A federated-learning client (see `sinter fl client`)"
)]
struct Args {
    /// The server's HOST:PORT.
    #[arg(long)]
    server: String,
    /// The client's config: its own `data.train`, and the `[model]` the server also runs.
    #[arg(long)]
    config: PathBuf,
    /// The client's name, kept across reconnections (default: client-PID).
    #[arg(long)]
    name: Option<String>,
    /// Give up when the server could not be reached for this long.
    #[arg(long, default_value_t = 60_000)]
    connect_timeout_ms: u64,
    /// Take the connection as lost when the server sends nothing for this long.
    #[arg(long, default_value_t = 600_000)]
    idle_timeout_ms: u64,
    /// File holding the shared secret (default: the SINTER_SECRET variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// One JSON object per event and a last `done` line on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SINTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e
                .downcast_ref::<node::JobError>()
                .map_or(exit::FAILURE, node::JobError::exit_code);
            ExitCode::from(code)
        }
    }
}

fn run(a: &Args) -> Result<()> {
    let cfg = JobConfig::load(&a.config, &[])?;
    let secret = match &a.secret_file {
        Some(f) => node::net::Secret::from_file(f)?,
        None => node::net::Secret::from_env("SINTER_SECRET")?,
    };
    let opts = ClientOptions {
        server: a.server.clone(),
        name: a
            .name
            .clone()
            .unwrap_or_else(|| format!("client-{}", std::process::id())),
        secret,
        connect_timeout_ms: a.connect_timeout_ms,
        idle_timeout_ms: a.idle_timeout_ms,
        part: None,
    };
    let json = a.json;
    let summary = node::fl::client::run(&cfg, &opts, &mut |ev| {
        let v = ev.to_json();
        if json {
            println!("{v}");
        } else {
            tracing::info!("{v}");
        }
    })?;
    let mut v = serde_json::to_value(&summary)?;
    v["event"] = "done".into();
    if json {
        println!("{v}");
    } else {
        println!(
            "done: trained {} of {} rounds on {} rows",
            summary.trained, summary.rounds, summary.samples
        );
    }
    Ok(())
}
