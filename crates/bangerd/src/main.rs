//! `bangerd` entry point: parses the few flags it has and runs the daemon in the foreground.
//! `banger` starts it detached on first use, so users rarely run it by hand.

use std::process::ExitCode;

use banger_config::Paths;

const HELP: &str = "bangerd - the banger daemon

Usage: bangerd [--help] [--version]

Serves banger's API on a private Unix socket ($XDG_RUNTIME_DIR/banger/bangerd.sock, or
~/.local/state/banger/run/bangerd.sock when XDG_RUNTIME_DIR is unset). The `banger` CLI starts
it automatically, detached, logging to ~/.local/state/banger/bangerd.log; use
`banger daemon status|stop|restart` to manage it. One daemon runs per user.
Set RUST_LOG (e.g. RUST_LOG=debug) for more detail in the log.";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--help" | "-h") => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("bangerd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("bangerd: unknown argument {other:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // hickory logs every DNS query at info; guests could grow the log without end.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "info,hickory_server=warn,hickory_proto=warn,hickory_net=warn",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = Paths::from_env()
        .map_err(anyhow::Error::from)
        .and_then(|paths| tokio::runtime::Runtime::new()?.block_on(bangerd::daemon::run(paths)));
    match result {
        Ok(bangerd::daemon::Startup::Serving) => ExitCode::SUCCESS,
        Ok(bangerd::daemon::Startup::AlreadyRunning) => {
            tracing::info!("another bangerd already serves this user; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The chain once, and the hints of its errors (a bad bridge_subnet says how to write it).
            let report = bangerd::hints::report(e.as_ref());
            tracing::error!("{report}");
            eprintln!("bangerd: {report}");
            ExitCode::FAILURE
        }
    }
}
