//! Policy files on disk: a file, or the policy files of a directory, read as (name, text)
//! pairs for `moat policy apply/validate` and the offline `moat policy explain/test`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Reads `path` (a file, or the policy files of a directory, sorted) as (name, text) pairs.
pub fn sources(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{} holds no .yaml, .yml or .json files", path.display());
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|f| {
            let meta =
                std::fs::metadata(&f).with_context(|| format!("cannot read {}", f.display()))?;
            if meta.len() > moat_policy::document::MAX_INPUT_BYTES as u64 {
                bail!(
                    "{}: {} bytes; the limit is {} per file",
                    f.display(),
                    meta.len(),
                    moat_policy::document::MAX_INPUT_BYTES
                );
            }
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read {} as UTF-8 text", f.display()))?;
            Ok((f.display().to_string(), text))
        })
        .collect()
}
