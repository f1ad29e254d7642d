//! `fresco`: the one binary operators and dataset builders run.

mod commands;
mod config;
mod prompts;

use clap::{Parser, Subcommand};

// Model code allocates and frees tensors of tens of megabytes every step; glibc hands each back to the
// kernel, and re-faulting the pages cost more time than the arithmetic (training ran 4 s/step, half of it
// in the kernel). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use commands::{client, coordinator, eval, export, generate, run, train, worker};

#[derive(Parser)]
#[command(name = "fresco", version, about = "Distributed batch text-to-image generation")]
struct Cli {
    /// Log filter (e.g. `info`, `fresco_worker=debug`).
    #[arg(long, global = true, env = "FRESCO_LOG", default_value = "warn")]
    log: String,
    /// File of `key = value` settings, each standing for FRESCO_KEY (the environment and flags win).
    #[arg(long, global = true, env = "FRESCO_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole job on this machine: embedded store, in-process workers, local output folder.
    Run(run::Args),
    /// Run the sampler pipeline directly and write one image per prompt.
    Generate(generate::Args),
    /// Serve the job queue over gRPC (PostgreSQL).
    Coordinator(coordinator::Args),
    /// Apply database migrations and exit (for a deployment's migration job).
    Migrate(coordinator::MigrateArgs),
    /// Lease batches from a coordinator, generate, upload, report.
    Worker(worker::Args),
    /// Submit a prompt file as a job; prints the job id.
    Submit(client::SubmitArgs),
    /// Show a job's state and counts.
    Status(client::JobArgs),
    /// Follow a job's progress until it ends.
    Watch(client::JobArgs),
    /// Cancel a job.
    Cancel(client::JobArgs),
    /// List jobs, newest first.
    Jobs(client::JobsArgs),
    /// List a job's images.
    Outputs(client::JobArgs),
    /// Export a job as a Parquet manifest or WebDataset shards.
    Export(export::Args),
    /// Train the bundled fresco-tiny models (diffusion and flow variants) on procedural shapes.
    Train(train::Args),
    /// Measure fresco-tiny models' prompt adherence on held-out prompts at several step counts.
    Eval(eval::Args),
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: it sets environment variables.
    fresco_pipeline::set_process_defaults();
    // The config file feeds the environment, so it must be applied before clap reads it.
    if let Err(e) = config::apply_from_args() {
        eprintln!("error: config file {e}");
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Some(path) = &cli.config {
        tracing::info!(path = %path.display(), "settings from config file (environment and flags take precedence)");
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        command => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(async move {
                match command {
                    Command::Run(a) => run::run(a).await,
                    Command::Coordinator(a) => coordinator::run(a).await,
                    Command::Worker(a) => worker::run(a).await,
                    Command::Migrate(a) => coordinator::migrate(a).await,
                    Command::Submit(a) => client::submit(a).await,
                    Command::Status(a) => client::status_cmd(a).await,
                    Command::Watch(a) => client::watch(a).await,
                    Command::Cancel(a) => client::cancel(a).await,
                    Command::Jobs(a) => client::jobs(a).await,
                    Command::Outputs(a) => client::outputs(a).await,
                    Command::Export(a) => export::run(a).await,
                    Command::Generate(_) | Command::Train(_) | Command::Eval(_) => unreachable!("handled above"),
                }
            }),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once. fresco's library errors state their cause in
/// their own message (a gRPC status or a log line shows only that) and also return it as their source,
/// so anyhow's `{:#}` would print it twice: "x.json: No such file (os error 2): No such file (os error 2)".
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if previous.ends_with(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
        previous = message;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[test]
    fn an_error_names_each_cause_once() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::from(fresco_tiny::TinyError::io(std::path::Path::new("tok/vocab.json"), missing)).context("writing models");
        assert_eq!(error_text(&e), "writing models: tok/vocab.json: no such file");
        // A cause its parent does not quote still shows.
        let e = anyhow::Error::from(std::io::Error::other("disk full")).context("saving");
        assert_eq!(error_text(&e), "saving: disk full");
    }
}
