//! Runs banger's `.vm` server on its own, outside the daemon, for `bench/dns.sh`: the same handler
//! and listeners the daemon uses, serving names read from a file.
//!
//! Usage: `dns-serve LISTEN_ADDR CLIENT_NET NAMES_FILE` where NAMES_FILE has one `NAME IPV4` pair
//! per line; it runs until killed. Names outside `.vm` get SERVFAIL (no upstream is configured).

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use banger_dns::{serve, Forwarder, Zone};

fn usage(msg: &str) -> ExitCode {
    eprintln!("dns-serve: {msg}\nusage: dns-serve LISTEN_ADDR CLIENT_NET NAMES_FILE");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, clients, names] = args.as_slice() else {
        return usage("expected three arguments");
    };
    let Ok(listen) = listen.parse() else {
        return usage(&format!("{listen}: not a socket address"));
    };
    let Ok(clients) = clients.parse::<ipnet::Ipv4Net>() else {
        return usage(&format!("{clients}: not an IPv4 network"));
    };
    let text = match std::fs::read_to_string(names) {
        Ok(t) => t,
        Err(e) => return usage(&format!("{names}: {e}")),
    };
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<Ipv4Addr>)) {
            (Some(name), Some(Ok(ip))) => entries.push((name.to_owned(), ip)),
            (None, _) => {}
            _ => return usage(&format!("{names}:{}: expected `NAME IPV4`", n + 1)),
        }
    }
    let zone = Zone::new();
    zone.replace(entries);
    let server = match serve(
        listen,
        clients,
        zone,
        Forwarder::with_timeout(Vec::new(), Duration::from_secs(1)),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dns-serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("dns-serve: listening on {}", server.local_addr());
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
