//! Logging set-up shared by `moat-control` and `moat-proxy`: the `MOAT_LOG` filter (a level and
//! per-target levels, refused when malformed) and the stderr subscriber in text or JSON. With
//! JSON logs every line a binary writes is a log event: [`startup`] and [`fatal`] turn the
//! plain lines of the text mode (`listening on ADDR` on stdout, the final error on stderr) into
//! events. Text lines off a terminal are written by [`Line`] (`line`): the default format's
//! bytes, with less work per line, since the proxy writes one for every request.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Level;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

mod line;
pub use line::Line;

/// A `MOAT_LOG` value that is not a filter: the value, why, and an example of one that is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("MOAT_LOG={value:?}: {why}; give a level and per-target levels, e.g. `{example}`")]
pub struct FilterError {
    pub value: String,
    pub why: String,
    pub example: String,
}

/// The filter in `value` (`MOAT_LOG`; `None`: unset, meaning `info`). `example` is shown in
/// the error, e.g. `info,moat::access=off`.
pub fn filter(value: Option<&str>, example: &str) -> Result<Targets, FilterError> {
    let Some(v) = value else {
        return Ok(Targets::new().with_default(Level::INFO));
    };
    let bad = |why: String| FilterError {
        value: v.to_owned(),
        why,
        example: example.to_owned(),
    };
    // A bare word is a level (`Targets` would take it for a target name and log nothing else).
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !part.contains('=') && part.parse::<LevelFilter>().is_err() {
            return Err(bad(format!(
                "`{part}` is not a level (trace, debug, info, warn, error, off)"
            )));
        }
    }
    v.parse().map_err(|e| bad(format!("{e}")))
}

/// [`filter`] of the `MOAT_LOG` environment variable.
pub fn filter_from_env(example: &str) -> Result<Targets, FilterError> {
    match std::env::var("MOAT_LOG") {
        Err(std::env::VarError::NotPresent) => filter(None, example),
        Err(std::env::VarError::NotUnicode(_)) => Err(FilterError {
            value: "(not UTF-8)".to_owned(),
            why: "MOAT_LOG is not valid UTF-8".to_owned(),
            example: example.to_owned(),
        }),
        Ok(v) => filter(Some(&v), example),
    }
}

/// Whether [`init`] installed JSON logs.
static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the logs are JSON.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// A start-up line (`listening on ADDR`): printed on stdout with text logs, where scripts and the
/// test harness read it; a log event (target `moat::startup`) with JSON logs.
pub fn startup(line: std::fmt::Arguments<'_>) {
    if json() {
        tracing::info!(target: "moat::startup", "{line}");
    } else {
        println!("{line}");
    }
}

/// The error a binary exits with: on stderr as plain text with text logs, a log event (target
/// `moat::exit`, level error) with JSON logs.
pub fn fatal(line: std::fmt::Arguments<'_>) {
    if json() {
        tracing::error!(target: "moat::exit", "{line}");
    } else {
        eprintln!("{line}");
    }
}

/// Installs the global subscriber: `json` or text lines through `writer`, filtered by `filter`.
pub fn init<W>(json: bool, filter: Targets, ansi: bool, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    JSON.store(json, Ordering::Relaxed);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let logs = tracing_subscriber::registry().with(filter);
    if json {
        logs.with(layer.json()).init();
    } else {
        logs.with(layer.event_format(Line::default())).init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_per_target_levels_are_filters() {
        for ok in [
            "info",
            "warn,moat::access=off",
            "moat=debug",
            "debug, moat_control=trace",
        ] {
            assert!(filter(Some(ok), "info").is_ok(), "{ok}");
        }
        assert!(filter(None, "info").is_ok());
    }

    #[test]
    fn typos_are_refused_with_the_reason() {
        let e = filter(Some("inf"), "info,moat::access=off").unwrap_err();
        assert_eq!(
            e.why,
            "`inf` is not a level (trace, debug, info, warn, error, off)"
        );
        // What the operator reads names the value, the reason and a filter that works.
        let shown = e.to_string();
        assert!(shown.contains("MOAT_LOG=\"inf\"") && shown.contains("info,moat::access=off"));
        let e = filter(Some("info,moat=loud"), "info").unwrap_err();
        assert_eq!(e.value, "info,moat=loud");
    }
}
