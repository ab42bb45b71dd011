//! What both command-line binaries (`slipway`, `slipway-controller`) do the
//! same way: parse their flags, start their runtime, print an error on one
//! line, and read durations such as `90s` or `7d`.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

/// EX_USAGE: the exit code of both binaries for bad arguments or
/// configuration.
pub const EXIT_USAGE: u8 = 64;

/// Parses the command line. Bad arguments print clap's message and give
/// [`EXIT_USAGE`] (clap alone would exit 2); `--help` and `--version` print
/// and give success.
pub fn parse<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|err| {
        let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
        let _ = err.print();
        ExitCode::from(code)
    })
}

/// The multi-thread tokio runtime; if it cannot start, prints why and gives
/// exit code 1.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("error: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        })
}

/// The error and its causes on one line for the `error:` line, skipping
/// causes whose text the previous messages already include (our errors
/// embed their source, so anyhow's `{:#}` would repeat it).
pub fn error_text(err: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    let mut next: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(cause) = next {
        next = cause.source();
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// A positive duration with a unit: `90s`, `30m`, `1h`, `7d`; `None` if the
/// text is not one.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return None,
    };
    match number.checked_mul(unit_secs) {
        Some(secs) if secs > 0 => Some(Duration::from_secs(secs)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use anyhow::Context as _;

    use super::*;

    /// An error that embeds its source in its message, as ours do.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to 127.0.0.1:1: {0}")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn error_text_names_each_cause_once() {
        let err = Err::<(), _>(Connect(std::io::Error::other("connection refused")))
            .context("listing nodes")
            .unwrap_err();
        assert_eq!(
            error_text(err.as_ref()),
            "listing nodes: cannot connect to 127.0.0.1:1: connection refused"
        );
    }

    #[test]
    fn duration_units() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        for bad in ["", "h", "1", "0h", "1w", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_none(), "{bad:?}");
        }
    }
}
