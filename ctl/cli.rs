//! The command line of capitctl (design.md, "capitctl").

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "capitctl", version, about = "Control capitd: master keys, grants, prices and usage")]
pub struct Cli {
    /// The daemon's control socket (default: $CAPIT_SOCKET, else from $CAPIT_HOME or the platform default).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print one JSON document on stdout instead of a table or sentence.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Master provider keys: the key is read from a no-echo prompt, or stdin when piped.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Upstream providers and their base URLs.
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// Model prices, USD per million tokens.
    #[command(subcommand)]
    Price(PriceCommand),
    /// Give an agent a capped key: `capitctl grant claude 5.00`.
    Grant(GrantArgs),
    /// Team budgets shared by many machines through Postgres: create, join, ls, usage, leave.
    #[command(subcommand)]
    Team(TeamCommand),
    /// List grants with their spend.
    Ls {
        /// Include revoked grants.
        #[arg(long)]
        all: bool,
    },
    /// Spend and tokens, in all or for one grant.
    Usage(UsageArgs),
    /// Kill a grant's key at once.
    Revoke { grant: String },
    /// Change a grant's limits in place (its key and spend stay).
    Set(SetArgs),
    /// Give a grant a new key; the old one stops working at once.
    Rotate { grant: String },
    /// Daemon version, uptime, addresses and counts.
    Status,
    /// The agents capit can install a key into, and which are found here.
    Agents,
    /// Take a grant's key out of the agent's configuration (the grant stays; see revoke).
    Uninstall { agent: String },
    /// Access requests from local programs, waiting for your answer.
    Requests,
    /// Approve an access request: a new grant (the program collects its key once) or a top-up.
    Approve(ApproveArgs),
    /// Deny an access request.
    Deny { id: String },
    /// Live view of requests, refusals, alerts and spend (`--json`: one event per line).
    Watch,
    /// The audit log: every change to keys, providers, prices, grants and the service.
    Log(LogArgs),
    /// Run capitd as a systemd user service (Linux) or a launchd agent (macOS).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print a shell completion script: capitctl completions bash > ~/.local/share/bash-completion/completions/capitctl
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page in roff: capitctl man | man -l -
    Man {
        /// capitctl or capitd.
        #[arg(default_value = "capitctl", value_parser = ["capitctl", "capitd"])]
        page: String,
    },
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    pub id: String,
    /// The cap to give instead of what was asked (for a top-up: the grant's new cap).
    #[arg(long, allow_hyphen_values = true)]
    pub cap: Option<String>,
    /// The allowed models, instead of those asked for (comma-separated; empty allows all).
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// The APIs allowed, instead of those asked for (comma-separated; empty allows all).
    #[arg(long, value_delimiter = ',')]
    pub apis: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Only changes since: 7d (ago), 2026-11-01, or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only changes to this grant.
    #[arg(long)]
    pub grant: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Install and start the service (or show what would be written with --dry-run).
    Install(InstallArgs),
    /// Stop the service and remove its file.
    Uninstall(ServiceArgs),
    /// The service manager's view and the daemon's.
    Status(ServiceArgs),
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The unit's name (capitd.service, or the agent dev.capit.capitd on macOS).
    #[arg(long, default_value = "capitd", hide = true)]
    pub name: String,
    /// systemd or launchd; another platform's only with --dry-run.
    #[arg(long, hide = true)]
    pub manager: Option<String>,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The proxy's address; loopback only.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// Print the unit (or plist) and where it would go; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// More capitd flags, after `--`: capitctl service install -- --on-alert 'CMD'
    #[arg(last = true)]
    pub capitd_flags: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Store the master key of a provider.
    Add {
        provider: String,
        /// A key that manages the provider's keys (OpenRouter's management key): every grant of
        /// the provider then gets its own key, capped by the provider too.
        #[arg(long)]
        management: bool,
    },
    /// List stored keys (fingerprints only).
    Ls {
        /// List the keys capit made on this provider's side (OpenRouter), with their limits and usage.
        #[arg(long, value_name = "PROVIDER")]
        remote: Option<String>,
    },
    /// Forget a provider's master key.
    Rm {
        provider: String,
        /// Forget its management key instead.
        #[arg(long)]
        management: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    Ls,
    /// Change a provider's base URL or zero pricing.
    Set {
        name: String,
        #[arg(long)]
        base_url: Option<String>,
        /// Price every request of this provider at zero (a local server).
        #[arg(long)]
        price_zero: Option<bool>,
    },
    /// Add a named OpenAI-compatible server (vLLM, Ollama, LM Studio, a gateway).
    Add {
        name: String,
        #[arg(long, default_value = "openai-compatible")]
        kind: String,
        #[arg(long)]
        base_url: String,
        #[arg(long)]
        price_zero: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PriceCommand {
    Ls,
    /// Override a model's prices (USD per million tokens).
    Set {
        model: String,
        #[arg(long, allow_hyphen_values = true)]
        input: String,
        #[arg(long, allow_hyphen_values = true)]
        output: String,
        #[arg(long, allow_hyphen_values = true)]
        cached_input: Option<String>,
        /// Price of a cache write (the 5-minute one where a provider has two).
        #[arg(long, allow_hyphen_values = true)]
        cache_write: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        cache_write_1h: Option<String>,
        #[arg(long)]
        max_output_tokens: Option<u64>,
    },
    /// Import a LiteLLM model_prices_and_context_window.json as your own prices (all or nothing).
    Import {
        file: std::path::PathBuf,
    },
    /// Fetch the current price list (LiteLLM's by default) and put it in place of the last one,
    /// all or nothing; your own prices stay on top of it.
    Update {
        /// A URL serving a file in LiteLLM's model_prices_and_context_window.json format.
        #[arg(long, default_value = crate::fetch::LITELLM_PRICES)]
        from: String,
    },
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// The agent (claude, codex, ...) or any name for a script.
    pub agent: String,
    /// The spend cap in US dollars, e.g. 5.00.
    #[arg(allow_hyphen_values = true)]
    pub amount: String,
    #[arg(long)]
    pub provider: Option<String>,
    #[arg(long, default_value = "month")]
    pub period: String,
    /// When the key stops working: 7d, 12h, 2026-12-31 (through that day), or an RFC 3339 time.
    #[arg(long)]
    pub expires: Option<String>,
    /// Allowed models, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Why this grant exists (kept with it).
    #[arg(long, default_value = "")]
    pub note: String,
    /// Print the key and base URL instead of installing them into the agent's configuration.
    #[arg(long)]
    pub no_install: bool,
    /// Show the change an install would make, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the base URL and key into this dotenv file (for any agent or script).
    #[arg(long)]
    pub env_file: Option<std::path::PathBuf>,
    /// Hand the agent an OpenRouter key capped by OpenRouter itself, for agents that cannot reach
    /// this machine's proxy (Cursor, remote agents); needs an OpenRouter management key.
    #[arg(long)]
    pub direct: bool,
    /// The billable APIs the grant may call: chat, responses, embeddings, messages, generate.
    #[arg(long, value_delimiter = ',')]
    pub apis: Vec<String>,
    /// A team pool this daemon has joined that the grant also draws on: a request must fit both.
    #[arg(long)]
    pub team: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Alert when spend reaches these percentages of the cap, once per period each (default
    /// 80,100; "off" for none).
    #[arg(long, value_delimiter = ',')]
    pub alert: Option<Vec<String>>,
}

/// Count and rate limits, for `grant` and `set` (with `set`, 0 removes a limit).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Requests the grant may make in all (a till-style activation count).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Tokens (input and output) the grant may use in all.
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[arg(long)]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long)]
    pub concurrency: Option<u64>,
    /// Lower a request's max output tokens to a fair share of what is left of the cap, rather
    /// than refuse it; on by default for new grants (`--fit false` to refuse instead).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub fit: Option<bool>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub grant: String,
    /// The new spend cap in US dollars.
    #[arg(long, allow_hyphen_values = true)]
    pub cap: Option<String>,
    #[arg(long)]
    pub period: Option<String>,
    /// A new expiry (7d, 2026-12-31, RFC 3339), or "never".
    #[arg(long)]
    pub expires: Option<String>,
    /// The allowed models, comma-separated; an empty value allows every priced model.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    #[arg(long)]
    pub note: Option<String>,
    /// The billable APIs allowed, comma-separated; an empty value allows all.
    #[arg(long, value_delimiter = ',')]
    pub apis: Option<Vec<String>>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// New alert thresholds in percent of the cap, e.g. 50,80,100; "off" for none.
    #[arg(long, value_delimiter = ',')]
    pub alert: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    pub grant: Option<String>,
    /// Only requests since: 7d (ago), 2026-11-01, or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Break the table down by model or by day, with a bar per row.
    #[arg(long, value_parser = ["model", "day"])]
    pub by: Option<String>,
    /// Write an SVG chart of spend per day (per grant, or per model for one grant) to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TeamCommand {
    /// Make a pool in the team database and join it: capitctl team create eng 200 --db postgres://capit@db/capit
    Create(TeamCreateArgs),
    /// Join a pool another machine made (the password from a no-echo prompt, stdin or PGPASSFILE).
    Join(TeamJoinArgs),
    /// The pools this daemon is a member of: cap, spend this period, leases, members.
    Ls,
    /// The pool's spend from its ledger copies, by member, grant, model or day.
    Usage(TeamUsageArgs),
    /// Leave a pool (report everything, give the lease back); its grants must be revoked first.
    Leave { name: String },
}

#[derive(Debug, Args)]
pub struct TeamDbArgs {
    /// The team database: postgres://USER@HOST[:PORT]/DATABASE[?sslmode=require&sslrootcert=FILE].
    /// Never with a password: it is read from PGPASSFILE (or ~/.pgpass), else a no-echo prompt,
    /// else stdin.
    #[arg(long, value_name = "URL")]
    pub db: String,
}

#[derive(Debug, Args)]
pub struct TeamCreateArgs {
    pub name: String,
    /// The pool's cap per period in US dollars, e.g. 200.
    #[arg(allow_hyphen_values = true)]
    pub amount: String,
    #[command(flatten)]
    pub db: TeamDbArgs,
    #[arg(long, default_value = "month", value_parser = ["day", "week", "month", "total"])]
    pub period: String,
    /// The time zone the pool's periods follow (IANA name, e.g. Europe/Berlin); default: this machine's.
    #[arg(long, value_name = "ZONE")]
    pub tz: Option<String>,
    /// Seconds a member's lease lasts unrenewed: a machine that dies has its lease charged as
    /// spend after this long, and its room comes back.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub lease_ttl: u32,
}

#[derive(Debug, Args)]
pub struct TeamJoinArgs {
    pub name: String,
    #[command(flatten)]
    pub db: TeamDbArgs,
}

#[derive(Debug, Args)]
pub struct TeamUsageArgs {
    pub name: String,
    /// Group by member (machine), grant, model or day (in the pool's time zone).
    #[arg(long, default_value = "member", value_parser = ["member", "grant", "model", "day"])]
    pub by: String,
    /// Since: 7d (ago), 2026-11-01, or an RFC 3339 time; default: the pool's current period.
    #[arg(long)]
    pub since: Option<String>,
}
