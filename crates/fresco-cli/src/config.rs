//! Configuration files: `--config FILE` (or `FRESCO_CONFIG`) holds `key = value` lines, each standing for
//! the `FRESCO_KEY` environment variable, so the layering is defaults < file < environment < flags with
//! clap doing the rest. Example:
//!
//! ```text
//! # coordinator.conf
//! database_url = "postgres://fresco@db/fresco"
//! listen = "0.0.0.0:50051"
//! tokens_file = "/etc/fresco/tokens"
//! ```

use std::path::Path;

/// Parses the file into `(FRESCO_NAME, value)` pairs; errors name the line.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| format!("line {}: expected key = value", i + 1))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("line {}: {key:?} is not a setting name", i + 1));
        }
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        out.push((format!("FRESCO_{}", key.to_ascii_uppercase().replace('-', "_")), value.to_string()));
    }
    Ok(out)
}

/// Applies the config file named by `--config` or `FRESCO_CONFIG` to the environment, where the environment
/// does not already set a value. Runs before any thread starts.
pub fn apply_from_args() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let from_flag = args.iter().position(|a| a == "--config").and_then(|i| args.get(i + 1).cloned());
    let from_eq = args.iter().find_map(|a| a.strip_prefix("--config=").map(str::to_string));
    let Some(path) = from_flag.or(from_eq).or_else(|| std::env::var("FRESCO_CONFIG").ok()) else { return Ok(()) };
    let text = std::fs::read_to_string(Path::new(&path)).map_err(|e| format!("{path}: {e}"))?;
    for (key, value) in parse(&text).map_err(|e| format!("{path}: {e}"))? {
        if std::env::var_os(&key).is_none() {
            std::env::set_var(key, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_map_to_environment_names() {
        let got = parse("# comment\ndatabase_url = \"postgres://x/y\"\nlease-ttl-secs = 30\n\n").unwrap();
        assert_eq!(got, vec![("FRESCO_DATABASE_URL".into(), "postgres://x/y".into()), ("FRESCO_LEASE_TTL_SECS".into(), "30".into())]);
        assert!(parse("just words").unwrap_err().contains("line 1"));
        assert!(parse("ok = 1\nbad key! = 2").unwrap_err().contains("line 2"));
    }
}
