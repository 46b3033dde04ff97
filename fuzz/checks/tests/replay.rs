//! Replays every committed corpus file (fuzz/corpus/<target>/) through its check on stable, so
//! a regression on any input the fuzzer kept fails the normal test run; checks the seeds still
//! reach deep into each parser; and runs the canonicaliser's property tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

type Check = fn(&[u8]);

const TARGETS: &[(&str, Check)] = &[
    ("canonical_path", moat_fuzz_checks::canonical_path),
    ("detect", moat_fuzz_checks::detect),
    ("csr", moat_fuzz_checks::csr),
    ("policy_document", moat_fuzz_checks::policy_document),
    ("jwt", moat_fuzz_checks::jwt),
    ("snapshot", moat_fuzz_checks::snapshot),
];

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_committed_corpus_input_still_holds() {
    for (target, check) in TARGETS {
        let inputs = files(&corpus(target));
        assert!(
            !inputs.is_empty(),
            "fuzz/corpus/{target} is empty: run fuzz/run"
        );
        for f in inputs {
            let data = std::fs::read(&f).unwrap();
            if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
                panic!("{target}: {} fails: {e:?}", f.display());
            }
        }
    }
}

/// The seeds reach the deep end of each parser: a token that verifies, a snapshot the proxy
/// accepts, a CSR and policies that validate. Without that the fuzzer would only ever see
/// early refusals.
#[test]
fn the_seeds_are_accepted_inputs() {
    let issuers = moat_fuzz_checks::trusted_issuers();
    for token in moat_fuzz_checks::seeds::SIGNED_TOKENS {
        assert!(moat_policy::jwt::verify(token, issuers).is_ok());
    }
    for (target, data) in moat_fuzz_checks::seeds::all() {
        if target == "snapshot" {
            use prost::Message as _;
            let pb = moat_api::v1::Snapshot::decode(&data[..]).unwrap();
            moat_proxy::snapshot::from_proto(pb, &moat_fuzz_checks::snapshot_identity()).unwrap();
        }
        if target == "csr" {
            moat_identity::csr::ValidatedCsr::from_der(&data).unwrap();
        }
    }
}

/// `cargo test -p moat-fuzz-checks -- --ignored write_seeds` (fuzz/run does it) writes the
/// generated seeds into the corpora.
#[test]
#[ignore = "writes files; run by fuzz/run"]
fn write_seeds() {
    for (target, data) in moat_fuzz_checks::seeds::all() {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!("seed-{:016x}", fnv(&data));
        std::fs::write(dir.join(name), data).unwrap();
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

#[test]
fn what_a_prefix_admits_stays_under_it() {
    use proptest::prelude::*;
    let piece = prop::sample::select(vec![
        "p", "admin", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%5c", "\\", ";", "x;",
        "..;", "%3b", "%3B", "%00", "%25", "%252e", "%", "a", "/", "//", "%61", "~", "%7e",
    ]);
    proptest!(ProptestConfig::with_cases(20_000), |(pieces in prop::collection::vec(piece, 0..10), seps in prop::collection::vec(any::<bool>(), 10))| {
        let mut raw = String::from("/p/");
        for (p, s) in pieces.iter().zip(&seps) {
            raw.push_str(p);
            if *s {
                raw.push('/');
            }
        }
        moat_fuzz_checks::canonical_path(raw.as_bytes());
    });
}

#[test]
fn any_printable_path_is_canonicalised_or_refused() {
    use proptest::prelude::*;
    proptest!(ProptestConfig::with_cases(20_000), |(raw in "/[ -~]{0,40}")| {
        moat_fuzz_checks::canonical_path(raw.as_bytes());
    });
}

#[test]
fn detection_never_changes_its_mind() {
    use proptest::prelude::*;
    proptest!(ProptestConfig::with_cases(5_000), |(head in "(GET|get|PROPFIND|PRI|\\x16\\x03)?[ -~]{0,20}", tail in "(\r\n)?[ -~]{0,10}")| {
        moat_fuzz_checks::detect(format!("{head}{tail}").as_bytes());
    });
}
