//! How data-printing commands print: `-o table` (the default; a human table or report), `-o
//! json` or `-o yaml` (the same data, for scripts). A command builds its data once as JSON and
//! says how to show it as text; [`Output::print`] does the rest, so every command offers the
//! same three formats in the same way.

use serde_json::Value;

/// `-o` / `--output`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// For people: tables and reports.
    #[default]
    #[value(alias = "text")]
    Table,
    /// One JSON document.
    Json,
    /// One YAML document.
    Yaml,
}

impl Output {
    /// Prints `data` as JSON or YAML, or runs `text` for the table form.
    pub fn print(self, data: &Value, text: impl FnOnce()) -> anyhow::Result<()> {
        match self {
            Output::Table => text(),
            Output::Json => println!("{}", serde_json::to_string_pretty(data)?),
            Output::Yaml => print!("{}", serde_yaml_ng::to_string(data)?),
        }
        Ok(())
    }

    /// Whether the output is for people (a table or a report), not for a program.
    pub fn is_table(self) -> bool {
        self == Output::Table
    }
}
