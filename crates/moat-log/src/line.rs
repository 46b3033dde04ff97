//! The text log line. The proxy writes an access-log line for every request, so formatting it
//! is on the request path: [`Line`] writes the same text as tracing-subscriber's default
//! (`Full`) format without colours, field by field into the line, where the default goes through
//! its styling layers and `core::fmt` for every part. Terminals (ANSI colours) get the default
//! format itself. A test holds the two to the same bytes for every value without a line break
//! or a backslash.
//!
//! The line: `TIMESTAMP LEVEL span{fields}:span: target: message field=value …`, the timestamp
//! RFC 3339 in UTC with microseconds, the level padded to five characters, `&str` values quoted
//! and escaped as Rust's `Debug` does, `%` values as their `Display`, `?` values as their
//! `Debug`. Where the default format writes a line break inside a message, an error or a `%`
//! value as it is, so one event can end its line and forge the next, `Line` escapes it: one
//! event is one line (see [`OneLine`] for what is escaped and how), and writes a backslash
//! doubled, so no escape in a line can be forged by a value. Control characters that drive
//! terminals are escaped wherever a value is unquoted.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::format::{DefaultFields, Format, FormatEvent, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The text line format (see the module documentation).
#[derive(Debug, Default)]
pub struct Line {
    /// The default format, for terminals: colours are not on the request path.
    coloured: Format,
}

impl<S> FormatEvent<S, DefaultFields> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, DefaultFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.coloured.format_event(ctx, writer, event);
        }
        // Events from the `log` crate name their real target in their fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write!(
            writer,
            "{} ",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        )?;
        writer.write_str(level(meta.level()))?;
        let sanitize = writer.sanitizes_ansi_escapes();
        if let Some(scope) = ctx.event_scope() {
            let mut any = false;
            for span in scope.from_root() {
                any = true;
                writer.write_str(span.metadata().name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<DefaultFields>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    escaped(&mut writer, sanitize, fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if any {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields {
            out: &mut writer,
            sanitize,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// The level and the space after it, padded as the default format pads it.
fn level(l: &Level) -> &'static str {
    match *l {
        Level::TRACE => "TRACE ",
        Level::DEBUG => "DEBUG ",
        Level::INFO => " INFO ",
        Level::WARN => " WARN ",
        Level::ERROR => "ERROR ",
    }
}

/// Writes an event's fields, space-separated: the message bare, the others as `name=value`.
struct Fields<'w, 'a> {
    out: &'w mut Writer<'a>,
    /// Whether control characters that drive terminals are escaped (messages and errors).
    sanitize: bool,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// Starts a field: the separator and, unless it is the message, `name=`. `None` when the
    /// field is not written (the `log.` fields already shown as the target, or an earlier
    /// write failed); `Some(true)` for the message.
    fn start(&mut self, field: &Field) -> Option<bool> {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.out.write_char(' ');
        }
        if name == "message" {
            return Some(true);
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .result
            .and_then(|()| self.out.write_str(name))
            .and_then(|()| self.out.write_char('='));
        Some(false)
    }

    fn put(&mut self, f: impl FnOnce(&mut Writer<'_>, bool) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = f(self.out, self.sanitize);
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match self.start(field) {
            Some(true) => self.put(|w, sanitize| escaped(w, sanitize, value)),
            Some(false) => self.put(|w, _| quoted(w, value)),
            None => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field).is_some() {
            self.put(|w, _| w.write_str(itoa::Buffer::new().format(value)));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field).is_some() {
            self.put(|w, _| w.write_str(itoa::Buffer::new().format(value)));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field).is_some() {
            self.put(|w, _| w.write_str(if value { "true" } else { "false" }));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.start(field).is_none() {
            return;
        }
        let name = field.name();
        self.put(|w, sanitize| {
            OneLine { out: w, sanitize }.write_fmt(format_args!("{value}"))?;
            let Some(mut source) = value.source() else {
                return Ok(());
            };
            write!(w, " {name}.sources=[")?;
            loop {
                OneLine { out: w, sanitize }.write_fmt(format_args!("{source}"))?;
                match source.source() {
                    Some(next) => {
                        w.write_str(", ")?;
                        source = next;
                    }
                    None => return w.write_char(']'),
                }
            }
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field).is_some() {
            self.put(|w, sanitize| {
                OneLine { out: w, sanitize }.write_fmt(format_args!("{value:?}"))
            });
        }
    }
}

/// `value` as `{:?}` writes it: quoted, with quotes, backslashes and non-printable characters
/// escaped. Plain printable ASCII, the common case, is written as it is.
fn quoted(w: &mut Writer<'_>, value: &str) -> fmt::Result {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        w.write_char('"')?;
        w.write_str(value)?;
        w.write_char('"')
    } else {
        write!(w, "{value:?}")
    }
}

/// `value` as one line: see [`OneLine`].
fn escaped(w: &mut Writer<'_>, sanitize: bool, value: &str) -> fmt::Result {
    OneLine { out: w, sanitize }.write_str(value)
}

/// A writer for what a line holds unquoted (messages, `%` and `?` values, errors and their
/// sources, span fields). It escapes line breaks always (LF, CR, VT, FF, NEL, U+2028, U+2029),
/// so a value cannot end the event's line and write a forged one after it, whatever a caller
/// sent or a library put in an error; and, when `sanitize`, the controls terminals act on (ESC,
/// BEL, BS, DEL and the C1 controls), so a value cannot rewrite the operator's terminal. C0
/// controls and DEL are written `\xNN`, the others `\u{N}`, LF and CR `\n` and `\r`. A
/// backslash is written `\\`, so every escape in a line was made here: a value holding a
/// backslash and an `n` cannot pass for one whose line break was escaped. Plain printable ASCII
/// without a backslash, nearly every value, is written as it is after one pass over its bytes.
struct OneLine<'w, 'a> {
    out: &'w mut Writer<'a>,
    sanitize: bool,
}

impl fmt::Write for OneLine<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.bytes()
            .all(|b| ((0x20..0x7f).contains(&b) && b != b'\\') || b == b'\t')
        {
            return self.out.write_str(s);
        }
        let mut rest = s;
        while let Some((at, c)) = rest
            .char_indices()
            .find(|&(_, c)| c == '\\' || breaks_lines(c) || (self.sanitize && drives_terminals(c)))
        {
            self.out.write_str(&rest[..at])?;
            match c {
                '\\' => self.out.write_str("\\\\")?,
                '\n' => self.out.write_str("\\n")?,
                '\r' => self.out.write_str("\\r")?,
                '\0'..='\x1f' | '\x7f' => write!(self.out, "\\x{:02x}", c as u32)?,
                c => write!(self.out, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.out.write_str(rest)
    }
}

/// The characters that end a line for some reader of a log: Unicode's mandatory breaks.
fn breaks_lines(c: char) -> bool {
    matches!(
        c,
        '\n' | '\x0b' | '\x0c' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

fn drives_terminals(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Lines written by a subscriber, shared with the test.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connect failed\x1b[2J")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("refused")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    /// Every kind of event the binaries write, and the awkward values an attacker or a library
    /// may put in one.
    fn events() {
        let peer = "spiffe://mesh.local/ns/shop/sa/orders";
        tracing::info!(target: "moat::access", direction = "inbound", peer = %peer, method = %"GET", path = %"/v1/items", detail = None::<&str>, decision = "allow", reason = "allowed", policy = "shop/web@3", status = 200u16, duration_ms = 4u64, request_id = %"0af7651916cd43dd8448eb211c80319c", "http");
        tracing::warn!(target: "moat::access", remote = %"127.0.0.1:5000", error = %"reset by peer", "tcp");
        tracing::info!(
            listen = "0.0.0.0:15001",
            "listening on {} with {} workers",
            "0.0.0.0:15001",
            1
        );
        tracing::error!(
            quoted = "a \"b\" \\ c\nd\te\u{7}\u{1b}é\u{85}",
            "bell\u{7} esc\u{1b}[31m c1\u{9b} del\u{7f} tab\t é"
        );
        tracing::debug!(n = -3i64, big = 18_446_744_073_709_551_615u64, yes = true, no = false, ratio = 0.25f64, wide = 7u128, list = ?vec!["a", "b"], "numbers");
        tracing::trace!(r#type = "kind", "raw name");
        let chained = Outer(Inner);
        tracing::warn!(
            error = &chained as &(dyn std::error::Error + 'static),
            "with sources"
        );
        let plain = Inner;
        tracing::warn!(
            error = &plain as &(dyn std::error::Error + 'static),
            "no source"
        );
        tracing::info!(empty = "", "");
        let outer = tracing::info_span!("conn", peer = %peer, port = 8080u16);
        let _o = outer.enter();
        let inner = tracing::info_span!("request");
        let _i = inner.enter();
        tracing::info!(target: "moat::access", status = 403u16, "inside spans");
        log_warning("rustls::conn", format_args!("from the log crate"));
    }

    /// A warning from the `log` crate, as a library that logs with it writes one.
    fn log_warning(target: &str, message: fmt::Arguments<'_>) {
        let record = log::Record::builder()
            .args(message)
            .level(log::Level::Warn)
            .target(target)
            .module_path(Some(target))
            .file(Some("src/lib.rs"))
            .line(Some(7))
            .build();
        tracing_log::format_trace(&record).unwrap();
    }

    fn lines_of(sink: &Sink) -> Vec<String> {
        String::from_utf8(sink.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The same events through `Line` and through tracing-subscriber's default format give the
    /// same lines, but for the timestamp, which is RFC 3339 with microseconds in both.
    #[test]
    fn writes_what_the_default_format_writes() {
        let ours = Sink::default();
        let theirs = Sink::default();
        let sub = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(ours.clone())
            .event_format(Line::default())
            .finish();
        tracing::subscriber::with_default(sub, events);
        let sub = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(theirs.clone())
            .finish();
        tracing::subscriber::with_default(sub, events);

        let (ours, theirs) = (lines_of(&ours), lines_of(&theirs));
        assert_eq!(ours.len(), theirs.len(), "{ours:#?}\n{theirs:#?}");
        for (a, b) in ours.iter().zip(&theirs) {
            let ((ta, ra), (tb, rb)) = (stamped(a), stamped(b));
            assert_eq!(ta.len(), tb.len(), "{ta} / {tb}");
            assert_eq!(ra, rb);
        }
        assert_eq!(ours.len(), 11, "{ours:#?}");
        // The ones that matter most read as the operator expects.
        assert!(ours[0].contains(" INFO moat::access: http direction=\"inbound\" peer=spiffe://mesh.local/ns/shop/sa/orders method=GET path=/v1/items decision=\"allow\""), "{}", ours[0]);
        assert!(
            ours.iter()
                .any(|l| l.contains("bell\\x07 esc\\x1b[31m c1\\u{9b} del\\x7f")),
            "{ours:#?}"
        );
        assert!(ours.iter().any(|l| l.contains("conn{peer=spiffe://mesh.local/ns/shop/sa/orders port=8080}:request: moat::access: inside spans status=403")));
        assert!(ours.iter().any(|l| l.contains(" WARN conn{")
            && l.ends_with(":request: rustls::conn: from the log crate")));
    }

    /// A line's timestamp and the rest; panics unless it starts with an RFC 3339 timestamp.
    fn stamped(line: &str) -> (&str, &str) {
        let (t, rest) = line.split_once(' ').expect(line);
        assert!(humantime::parse_rfc3339(t).is_ok(), "{line:?}");
        (t, rest)
    }

    /// Whatever a value holds, one event is one line: every kind of unquoted value (message,
    /// `%` and `?` values, an error and its sources, a span's fields, a `log` record) with
    /// every line break in it is written escaped, and the line ends where the event ends. An
    /// attacker's `\n` followed by a forged access-log line stays inside the first line.
    #[test]
    fn one_event_is_one_line() {
        #[derive(Debug)]
        struct Broken(&'static str);
        impl fmt::Display for Broken {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Broken {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&Inner)
            }
        }
        const FORGED: &str =
            "x\n2026-12-03T00:00:00.000000Z  INFO moat::access: http decision=\"allow\"";
        const BREAKS: &str = "a\nb\rc\x0bd\x0ce\u{85}f\u{2028}g\u{2029}h";
        let sink = Sink::default();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(sink.clone())
            .event_format(Line::default())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "moat::access", path = %FORGED, "http");
            tracing::info!(target: "moat::access", path = %"/a\\nb\\", "http");
            tracing::info!(value = %BREAKS, debug = ?Broken(BREAKS), "{BREAKS}");
            let e = Broken(BREAKS);
            tracing::warn!(error = &e as &(dyn std::error::Error + 'static), "failed");
            let span = tracing::info_span!("conn", peer = %BREAKS);
            let _s = span.enter();
            tracing::info!("in a span");
            log_warning("h2::codec", format_args!("{BREAKS}"));
        });
        let lines = lines_of(&sink);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        for line in &lines {
            stamped(line);
        }
        let escaped = "a\\nb\\rc\\x0bd\\x0ce\\u{85}f\\u{2028}g\\u{2029}h";
        assert!(lines[0].ends_with(
            "moat::access: http path=x\\n2026-12-03T00:00:00.000000Z  INFO moat::access: http decision=\"allow\""
        ), "{}", lines[0]);
        // A backslash a value holds is doubled: `\n` in a line is always an escaped break.
        assert!(
            lines[1].ends_with("moat::access: http path=/a\\\\nb\\\\"),
            "{}",
            lines[1]
        );
        let lines = [&lines[..1], &lines[2..]].concat();
        assert!(lines[1].ends_with(&format!(
            ": {escaped} value={escaped} debug=Broken(\"a\\\\nb\\\\rc\\\\u{{b}}d\\\\u{{c}}e\\\\u{{85}}f\\\\u{{2028}}g\\\\u{{2029}}h\")"
        )), "{}", lines[1]);
        assert!(
            lines[2].ends_with(&format!(": failed error={escaped} error.sources=[refused]")),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].contains(&format!(" conn{{peer={escaped}}}: ")),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].ends_with(&format!(": h2::codec: {escaped}")),
            "{}",
            lines[4]
        );
        // Nothing a line-splitting reader would take for a break is left.
        let all = lines.concat();
        assert!(!all.contains(['\x0b', '\x0c', '\u{85}', '\u{2028}', '\u{2029}']));
    }

    /// A terminal gets the default format's colours.
    #[test]
    fn terminals_get_colours() {
        let sink = Sink::default();
        let sub = tracing_subscriber::fmt()
            .with_ansi(true)
            .with_writer(sink.clone())
            .event_format(Line::default())
            .finish();
        tracing::subscriber::with_default(sub, || tracing::info!(a = 1u64, "coloured"));
        let line = &lines_of(&sink)[0];
        assert!(line.contains("\x1b[32m INFO\x1b[0m"), "{line:?}");
    }
}
