//! `fresco`: the one binary operators and dataset builders run. Subcommands map onto the crates:
//! `generate` (pipeline alone), and the service and client commands as they land.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fresco", version, about = "Distributed batch text-to-image generation")]
struct Cli {
    /// Log filter (e.g. `info`, `fresco=debug`); also FRESCO_LOG.
    #[arg(long, global = true, env = "FRESCO_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sampler pipeline directly and write one image per prompt.
    Generate(commands::generate::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
