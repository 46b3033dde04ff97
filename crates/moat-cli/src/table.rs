//! The CLI's tables (`-o table`, the default): columns as wide as their widest cell, two spaces
//! apart, no borders, so the output reads like kubectl's and splits on whitespace. Laid out by
//! comfy-table; a row may carry detail lines printed under it (a NACK, a rule's counters).

use std::fmt::Display;

use comfy_table::{CellAlignment, ColumnConstraint, presets};

/// A table being filled; [`Table::print`] writes it to stdout.
pub struct Table {
    inner: comfy_table::Table,
    /// Lines to print under each row, by row.
    details: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        let mut inner = comfy_table::Table::new();
        inner
            .load_preset(presets::NOTHING)
            .set_header(header.to_vec());
        let last = header.len().saturating_sub(1);
        for (i, column) in inner.column_iter_mut().enumerate() {
            column.set_padding((0, if i == last { 0 } else { 2 }));
            // A cell is never wrapped or cut: the table is as wide as its content.
            column.set_constraint(ColumnConstraint::ContentWidth);
        }
        Table {
            inner,
            details: Vec::new(),
        }
    }

    /// Right-aligns the columns at `indices` (numbers).
    pub fn right(mut self, indices: &[usize]) -> Self {
        for &i in indices {
            if let Some(column) = self.inner.column_mut(i) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        self
    }

    /// Adds a row.
    pub fn row<I>(&mut self, cells: I)
    where
        I: IntoIterator,
        I::Item: Display,
    {
        self.inner
            .add_row(cells.into_iter().map(|c| c.to_string()).collect::<Vec<_>>());
        self.details.push(Vec::new());
    }

    /// A line printed under the last row added.
    pub fn detail(&mut self, line: String) {
        if let Some(d) = self.details.last_mut() {
            d.push(line);
        }
    }

    /// The table as text lines: the header, then each row followed by its details.
    pub fn lines(&self) -> Vec<String> {
        let mut rows = self.inner.lines().map(|l| l.trim_end().to_owned());
        let mut out: Vec<String> = rows.next().into_iter().collect();
        for (row, details) in rows.zip(&self.details) {
            out.push(row);
            out.extend(details.iter().cloned());
        }
        out
    }

    /// Writes the table to stdout.
    pub fn print(&self) {
        for line in self.lines() {
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_widest_cell_and_details_follow_their_row() {
        let mut t = Table::new(&["ID", "USES", "STATE"]).right(&[1]);
        t.row(["a", "1/1", "used"]);
        t.detail("    last NACK: bad".into());
        t.row([
            "a-much-longer-identity-than-any-fixed-width-would-allow-for-here",
            "10/10",
            "active",
        ]);
        let lines = t.lines();
        let id_width = "a-much-longer-identity-than-any-fixed-width-would-allow-for-here".len();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert_eq!(
            lines[0],
            format!("{:<id_width$}  {:>5}  STATE", "ID", "USES"),
            "{lines:#?}"
        );
        assert_eq!(lines[1], format!("{:<id_width$}  {:>5}  used", "a", "1/1"));
        assert_eq!(lines[2], "    last NACK: bad");
        assert!(lines[3].ends_with("  10/10  active"), "{lines:#?}");
        assert!(lines.iter().all(|l| l == l.trim_end()));
    }
}
