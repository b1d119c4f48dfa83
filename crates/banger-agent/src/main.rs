//! `banger-agent`: the guest agent binary. All logic lives in the library; this only reads
//! the arguments.

use std::process::ExitCode;

const USAGE: &str = "\
usage: banger-agent              run the guest agent (started by systemd in banger VMs;
                                 as PID 1, it is the init of images without one)
       banger-agent --version    print the agent version
       banger-agent --unit       print the systemd unit that runs it";

fn main() -> ExitCode {
    // As PID 1 the arguments are whatever the kernel passed on (unknown command-line words).
    if banger_agent::guest::init::is_pid1() {
        banger_agent::guest::init::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => banger_agent::guest::run(),
        ["--version"] => {
            println!("banger-agent {}", banger_agent::protocol::AGENT_VERSION);
            ExitCode::SUCCESS
        }
        ["--unit"] => {
            print!("{}", banger_agent::SYSTEMD_UNIT);
            ExitCode::SUCCESS
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("banger-agent: unexpected arguments {args:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
