//! `capitctl`: controls capitd over its Unix socket. Thin: parse, run, print the error.
//! Exit codes: 0 success, 1 failure (one line on stderr), 2 bad usage (clap).

mod audit;
mod chart;
mod cli;
mod cmd;
mod consumers;
mod dashboard;
mod fetch;
mod install;
mod output;
mod remote;
mod requests;
mod service;
mod team;
mod watch;
mod when;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("capitctl: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capitctl: {}", output::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
