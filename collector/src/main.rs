//! `vigil-collector`: serve agents, print the status table, validate config, manage the CA.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use vigil_collector::{Collector, Config, Store, ca, status};

/// mimalloc instead of glibc malloc: ingest allocates per result on every worker thread; with
/// mimalloc the collector spent about a fifth less CPU per result under load (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Vigil collector: receives check results from agents over mutually authenticated gRPC,
/// stores them in PostgreSQL and keeps the state of every service.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format: text (for people; colours only on a terminal) or json (one object per line,
    /// for log shippers).
    #[arg(
        long,
        value_enum,
        env = "VIGIL_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: vigil_log::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the collector until SIGINT/SIGTERM; SIGHUP reloads the config (a bad config is
    /// reported and the running one stays in force).
    Serve {
        /// collector.yaml; service files are read from its services_dir.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print every service: node, category, state, last check, response time, 24 h failure rate,
    /// last error.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate collector.yaml and every service file, then exit (non-zero on any error).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Act on a service through the same path as automatic remediation (audited with --as).
    Ctl {
        #[arg(long, short)]
        config: PathBuf,
        /// Who asks (recorded with the command); default: $USER.
        #[arg(long = "as", env = "USER", default_value = "cli")]
        who: String,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Pre-flight check: config (every file), certificates, database, SSH to agentless nodes.
    /// One line per finding (OK, WARN, ERROR with how to fix it); exit status 1 on any ERROR.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// A name agents use to reach the collector (repeatable); the server certificate must
        /// cover it (the grpc_listen address is checked too unless it is 0.0.0.0).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// API tokens for the REST API and the dashboard login (stored hashed).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Certificate authority for the agent stream.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Availability report of every configured service and node over a window (default: the last
    /// full calendar month, UTC), from the database the config names: uptime %, incidents, down
    /// time, MTTR, MTBF.
    #[command(
        long_about = "Availability report of every configured service and node over a window \
(default: the last full calendar month, UTC), read from the database the config names.

Figures come from the recorded state transitions, not from sampling. Down: state down, or stale \
(no fresh result; a down node makes its services stale). Not counted (left out of the uptime's \
denominator): paused, stopped, in maintenance, no result yet. Uptime = up / (up + down). An \
incident is a stretch of down time (one interrupted only by a pause or maintenance stays one); \
MTTR = down time / incidents, MTBF = up time / incidents. A node's figures add up its services' \
times. Time after now is not counted.",
        after_help = "Examples:
  vigil-collector report -c collector.yaml                                  # last month, JSON
  vigil-collector report -c collector.yaml --from 2026-10-01 --to 2026-11-01 --format csv
  vigil-collector report -c collector.yaml --format html --out availability.html"
    )]
    Report {
        /// collector.yaml; the report reads the database it names.
        #[arg(long, short)]
        config: PathBuf,
        /// Start: RFC 3339 (2026-11-01T00:00:00Z) or a UTC date (2026-11-01); default: the first
        /// day of last month (30 days before --to when only --to is given).
        #[arg(long, value_parser = vigil_collector::report::parse_when)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// End, exclusive (same forms); default: the first day of this month (now when only
        /// --from is given). At most 400 days after --from.
        #[arg(long, value_parser = vigil_collector::report::parse_when)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// json (figures in seconds), csv (one row per service, per node, and a total) or html
        /// (one self-contained page).
        #[arg(long, value_enum, default_value = "json")]
        format: vigil_collector::report::Format,
        /// Write the report to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Maintenance windows: scheduled silences during which the services they cover are neither
    /// restarted nor alerted about (checks go on). Talks to the database directly.
    Maintenance {
        #[command(subcommand)]
        command: MaintenanceCommand,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2025-06-01T22:00:00Z: {e}"))
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum MaintenanceCommand {
    /// Create a window. One-off: --from (default now) and --to or --duration. Recurring:
    /// --every daily|weekly (weekly: --days), --start HH:MM, --duration, --time-zone. Say which
    /// services it covers with any of --service, --node, --category, --label (a service must
    /// satisfy every one given; repeat a flag for several values).
    #[command(after_help = "Examples:
  vigil-collector maintenance add -c collector.yaml --name 'db upgrade' --service db --duration 2h
  vigil-collector maintenance add -c collector.yaml --name 'kernel updates' --node gpu-1 \\
      --from 2025-06-01T22:00:00Z --to 2025-06-02T01:00:00Z
  vigil-collector maintenance add -c collector.yaml --name 'nightly backup' --label env=prod \\
      --every weekly --days sat,sun --start 02:00 --duration 90m --time-zone Europe/Berlin")]
    Add {
        #[arg(long, short)]
        config: PathBuf,
        /// Who creates it (recorded); default: $USER.
        #[arg(long = "as", env = "USER", default_value = "cli")]
        who: String,
        /// What the window is for.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        comment: String,
        /// One-off: start (RFC 3339, e.g. 2025-06-01T22:00:00Z); default now.
        #[arg(long, value_parser = parse_time)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// One-off: end (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        /// How long it lasts (90m, 2h); one-off: instead of --to.
        #[arg(long)]
        duration: Option<String>,
        /// Recurring: daily or weekly.
        #[arg(long, value_parser = ["daily", "weekly"])]
        every: Option<String>,
        /// Weekly: the days it starts on (mon,tue,...).
        #[arg(long, value_delimiter = ',')]
        days: Vec<String>,
        /// Recurring: local start time, HH:MM.
        #[arg(long)]
        start: Option<String>,
        /// Recurring: IANA time zone of --start (default UTC), e.g. Europe/Berlin.
        #[arg(long)]
        time_zone: Option<String>,
        /// A service id it covers (repeatable).
        #[arg(long = "service")]
        services: Vec<String>,
        /// A node whose services it covers (repeatable).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// A category it covers: api, web, container, system, gpu (repeatable).
        #[arg(long = "category")]
        categories: Vec<String>,
        /// key=value: covered services carry this label (repeatable; all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// List the windows: schedule, matcher, whether in force now or when next.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Delete a window by id; the services it covered leave maintenance at once.
    Delete {
        #[arg(long, short)]
        config: PathBuf,
        id: i64,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Start the service (a stopped service becomes active again).
    Start { service: String },
    /// Stop the service on purpose: it is then `stopped` and never restarted automatically.
    Stop { service: String },
    /// Restart the service now.
    Restart { service: String },
    /// Run the service's check now and print its result.
    Check { service: String },
    /// Maintenance: checks go on, but no restart and no alert (until resume or --for expires).
    Pause {
        service: String,
        /// End the pause automatically after this long (e.g. 2h).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// End a pause.
    Resume { service: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (once: only its hash is kept).
    Create {
        #[arg(long, short)]
        config: PathBuf,
        /// viewer reads; operator also starts/stops/restarts/checks; admin also changes the
        /// health-check config.
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// A unique name (who the token is for; recorded on what it does).
        #[arg(long)]
        name: String,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Revoke a token by name; its dashboard sessions end at once.
    Revoke {
        #[arg(long, short)]
        config: PathBuf,
        name: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA and the collector's server certificate in DIR (refuses to overwrite).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS name or IP agents use to reach the collector (repeatable); localhost and
        /// 127.0.0.1 are always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Create a client certificate for an agent; its identity is the node name.
    Issue {
        #[arg(long)]
        node: String,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            vigil_log::init(cli.log_format);
            serve(config).await
        }
        Command::Status { config } => {
            let cfg = Config::load(&config)?;
            let store = Store::connect(&cfg.database_url, 1).await?;
            let rows = store.status().await?;
            let now = chrono::Utc::now();
            print!("{}", status::render(&rows, now));
            print!("{}", status::render_nodes(&store.nodes().await?, now));
            Ok(())
        }
        Command::Ctl {
            config,
            who,
            wait,
            action,
        } => ctl(config, who, wait, action).await,
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            println!(
                "{}: OK ({} nodes, {} services)",
                config.display(),
                cfg.nodes.len(),
                cfg.services.len()
            );
            Ok(())
        }
        Command::Doctor { config, hosts } => {
            let report = vigil_collector::doctor::run(&config, &hosts).await;
            print!("{report}");
            if report.has_errors() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Token { command } => token(command).await,
        Command::Report {
            config,
            from,
            to,
            format,
            out,
        } => report(config, from, to, format, out).await,
        Command::Maintenance { command } => maintenance(command).await,
        Command::Ca { command } => match command {
            CaCommand::Init { dir, hosts } => {
                for f in ca::init(&dir, &hosts)? {
                    println!("wrote {}", f.display());
                }
                Ok(())
            }
            CaCommand::Issue { node, dir } => {
                for f in ca::issue(&dir, &node)? {
                    println!("wrote {}", f.display());
                }
                println!(
                    "copy ca.pem, {node}.pem and {node}.key to the node and set node: {node} in its agent.yaml"
                );
                Ok(())
            }
        },
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path).context("refusing to start with an invalid config")?;
    tracing::info!(
        config = %path.display(),
        nodes = cfg.nodes.len(),
        services = cfg.services.len(),
        "config loaded"
    );
    let collector = Collector::start(cfg).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match collector.reload(&path).await {
                    Ok(()) => tracing::info!(config = %path.display(), "config reloaded"),
                    Err(e) => tracing::error!(error = %e, "config reload failed; the previous config stays in force"),
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down");
    collector.shutdown().await;
    Ok(())
}

async fn ctl(
    path: PathBuf,
    who: String,
    wait: std::time::Duration,
    action: CtlAction,
) -> anyhow::Result<()> {
    let cfg = Config::load(&path)?;
    let (verb, service) = match &action {
        CtlAction::Start { service } => ("start", service),
        CtlAction::Stop { service } => ("stop", service),
        CtlAction::Restart { service } => ("restart", service),
        CtlAction::Check { service } => ("check", service),
        CtlAction::Pause { service, .. } => ("pause", service),
        CtlAction::Resume { service } => ("resume", service),
    };
    let Some(svc) = cfg.service(service) else {
        let mut ids: Vec<&str> = cfg.services.iter().map(|s| s.id.as_str()).collect();
        ids.sort_unstable();
        anyhow::bail!("no service {service:?}; services: {}", ids.join(", "));
    };
    let store = Store::connect(&cfg.database_url, 1).await?;
    match action {
        CtlAction::Pause { duration, .. } => {
            let until = duration
                .map(|d| chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
            store
                .set_mode(&svc.id, "paused", until, &format!("paused by {who}"))
                .await?;
            println!(
                "{} paused{}",
                svc.id,
                until.map(|u| format!(" until {u}")).unwrap_or_default()
            );
            return Ok(());
        }
        CtlAction::Resume { .. } => {
            store
                .set_mode(&svc.id, "active", None, &format!("resumed by {who}"))
                .await?;
            println!("{} active", svc.id);
            return Ok(());
        }
        _ => {}
    }
    let id = vigil_collector::remediation::request(&store, svc, verb, &who)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} already has a command in flight; see its outcome first",
                svc.id
            )
        })?;
    println!(
        "command {id}: {verb} {} on {} (requested by {who})",
        svc.id, svc.node
    );
    let until = std::time::Instant::now() + wait;
    loop {
        let row = store
            .command(id)
            .await?
            .context("the command disappeared")?;
        if row.finished_at.is_some() {
            println!(
                "{}: {}{}",
                row.status,
                row.via
                    .as_deref()
                    .map(|v| format!("via {v}, "))
                    .unwrap_or_default(),
                row.exit_code
                    .map(|c| format!("exit code {c}"))
                    .unwrap_or_else(|| "no exit code".into())
            );
            if !row.output.is_empty() {
                println!("{}", row.output.trim_end());
            }
            if verb == "check"
                && let Some((status, message, ms)) = store.check_now_result(&svc.node, id).await?
            {
                println!(
                    "check: {} in {ms} ms: {message}",
                    status.as_str().to_uppercase()
                );
            }
            if row.status != "succeeded" {
                std::process::exit(1);
            }
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            anyhow::bail!(
                "command {id} is still {} after {}; it goes on (deadline {})",
                row.status,
                humantime::format_duration(wait),
                row.deadline
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn token(command: TokenCommand) -> anyhow::Result<()> {
    use vigil_collector::web::auth::{Role, create_token};
    let (TokenCommand::Create { config: path, .. }
    | TokenCommand::List { config: path }
    | TokenCommand::Revoke { config: path, .. }) = &command;
    let cfg = Config::load(path)?;
    let store = Store::connect(&cfg.database_url, 1).await?;
    match command {
        TokenCommand::Create { role, name, .. } => {
            if name.trim().is_empty() || name.len() > 64 {
                anyhow::bail!("--name must be 1 to 64 characters");
            }
            let role = Role::parse(&role).context("unknown role")?;
            let (token, id) = create_token(&store, &name, role).await?;
            eprintln!(
                "token {id} {name:?} ({}) created; it is shown once, store it now:",
                role.as_str()
            );
            println!("{token}");
        }
        TokenCommand::List { .. } => {
            let rows = store.tokens().await?;
            println!(
                "{:<5} {:<24} {:<9} {:<20} {:<20} STATE",
                "ID", "NAME", "ROLE", "CREATED", "LAST USED"
            );
            let fmt = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            for t in rows {
                println!(
                    "{:<5} {:<24} {:<9} {:<20} {:<20} {}",
                    t.id,
                    t.name,
                    t.role,
                    fmt(Some(t.created_at)),
                    fmt(t.last_used),
                    match t.revoked_at {
                        Some(at) => format!("revoked {}", fmt(Some(at))),
                        None => "active".into(),
                    }
                );
            }
        }
        TokenCommand::Revoke { name, .. } => {
            if !store.revoke_token(&name).await? {
                anyhow::bail!("no active token named {name:?} (see `token list`)");
            }
            println!("token {name:?} revoked");
        }
    }
    Ok(())
}

/// The flag of `maintenance add` that a refused field comes from.
fn flag_of(field: &str) -> &str {
    match field {
        "services" => "--service",
        "nodes" => "--node",
        "categories" => "--category",
        "labels" => "--label",
        "recurrence" => "--every",
        "time_zone" => "--time-zone",
        "matcher" => "--service/--node/--category/--label",
        "name" => "--name",
        "comment" => "--comment",
        "from" => "--from",
        "to" => "--to",
        "duration" => "--duration",
        "days" => "--days",
        "start" => "--start",
        other => other,
    }
}

async fn maintenance(command: MaintenanceCommand) -> anyhow::Result<()> {
    use vigil_collector::maintenance::{
        Known, Recurrence, WindowSpec, apply, describe, describe_matcher, views,
    };
    let (MaintenanceCommand::Add { config: path, .. }
    | MaintenanceCommand::List { config: path }
    | MaintenanceCommand::Delete { config: path, .. }) = &command;
    let cfg = Config::load(path)?;
    let store = Store::connect(&cfg.database_url, 1).await?;
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    match command {
        MaintenanceCommand::Add {
            who,
            name,
            comment,
            from,
            to,
            duration,
            every,
            days,
            start,
            time_zone,
            services,
            nodes,
            categories,
            labels,
            ..
        } => {
            let spec = WindowSpec {
                name,
                comment,
                from,
                to,
                recurrence: every.map(|e| {
                    if e == "weekly" {
                        Recurrence::Weekly
                    } else {
                        Recurrence::Daily
                    }
                }),
                days,
                start,
                duration,
                time_zone,
                services,
                nodes,
                categories,
                labels,
            };
            let spec = spec
                .normalize(&Known::of(&cfg), chrono::Utc::now())
                .map_err(|e| anyhow::anyhow!("{}: {}", flag_of(e.field), e.reason))?;
            let id = store
                .create_maintenance(&spec, &format!("cli:{who}"))
                .await?;
            apply(&store, &cfg).await?;
            let row = store
                .maintenance_window(id)
                .await?
                .context("the window disappeared")?;
            let v = views(&[row], &cfg, chrono::Utc::now())
                .pop()
                .context("the window disappeared")?;
            println!(
                "maintenance window {id} {:?} created: {}; matches {}",
                spec.name,
                describe(&spec),
                describe_matcher(&spec)
            );
            match (v.active_until, v.next_start) {
                (Some(u), _) => println!("in force now, until {}", fmt(u)),
                (None, Some(n)) => println!("next in force from {}", fmt(n)),
                (None, None) => println!("never in force again"),
            }
            if v.covers.is_empty() {
                println!("covers no configured service (yet)");
            } else {
                println!("covers: {}", v.covers.join(", "));
            }
        }
        MaintenanceCommand::List { .. } => {
            let rows = store.maintenance_windows().await?;
            let now = chrono::Utc::now();
            println!(
                "{:<5} {:<24} {:<44} {:<32} {:<30} CREATED BY",
                "ID", "NAME", "SCHEDULE", "MATCHES", "STATE"
            );
            for v in views(&rows, &cfg, now) {
                let state = match (v.active_until, v.next_start) {
                    (Some(u), _) => format!("ACTIVE until {}", fmt(u)),
                    (None, Some(n)) => format!("next {}", fmt(n)),
                    (None, None) => "over".into(),
                };
                println!(
                    "{:<5} {:<24} {:<44} {:<32} {:<30} {}",
                    v.id,
                    v.spec.name,
                    describe(&v.spec),
                    describe_matcher(&v.spec),
                    state,
                    v.created_by
                );
            }
        }
        MaintenanceCommand::Delete { id, .. } => {
            let Some(name) = store.delete_maintenance(id).await? else {
                anyhow::bail!("no maintenance window {id} (see `maintenance list`)");
            };
            apply(&store, &cfg).await?;
            println!("maintenance window {id} {name:?} deleted");
        }
    }
    Ok(())
}

async fn report(
    config: PathBuf,
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
    format: vigil_collector::report::Format,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use vigil_collector::report;
    let now = chrono::Utc::now();
    let (month_from, month_to) = report::last_full_month(now);
    let (from, to) = match (from, to) {
        (None, None) => (month_from, month_to),
        (Some(f), None) => (f, now.max(f + chrono::Duration::seconds(1))),
        (None, Some(t)) => (t - chrono::Duration::days(30), t),
        (Some(f), Some(t)) => (f, t),
    };
    if let Err((field, msg)) = vigil_collector::web::availability::check_window(from, to) {
        anyhow::bail!("--{field}: {msg}");
    }
    let cfg = Config::load(&config)?;
    let store = Store::connect(&cfg.database_url, 1).await?;
    let r = report::build(&store, from, to, now).await?;
    let text = report::render(&r, format);
    match out {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}
