//! `capitd`: parse flags, set up logging, run the daemon until SIGTERM/SIGINT.
//! Exit codes: 0 clean stop, 1 failure, 2 bad usage (clap), 78 bad configuration.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // glibc gives every thread that allocates its own arena; with 1,000 streams open that costs
    // capitd a quarter of its memory in fragmentation. Two arenas serve its few threads.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator, and runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = capit::config::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPIT_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes where stderr is not a terminal (journald, launchd's log file, a pipe).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let config = match capit::config::Config::load(cli, capit::paths::PathEnv::from_process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("capitd: {e}");
            return ExitCode::from(78);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("capitd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(capit::app::run(config, capit::shutdown::signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capitd: {e}");
            ExitCode::FAILURE
        }
    }
}
