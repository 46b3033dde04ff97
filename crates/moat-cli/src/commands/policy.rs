//! `moat policy apply|get|delete|validate`. Documents are validated locally first (the same
//! parser the control plane runs again before storing), and a set is applied whole or not at all.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Subcommand;
use moat_api::v1::{
    ApplyPoliciesRequest, DeletePolicyRequest, ListPoliciesRequest, PolicyHistoryRequest,
    PolicySource,
};
use moat_identity::TrustDomain;
use moat_policy::{Document, parse_new_documents};

use super::admin;
use super::policy_files::sources;
use crate::Global;
use crate::connect::status;
use crate::output::Output;
use crate::table::Table;

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate and apply AccessPolicy/MeshConfig documents from a file or every .yaml/.yml/.json
    /// file of a directory. Nothing is applied if any document is invalid.
    Apply {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
    },
    /// Show stored policies (all, or one `namespace/name`); `-o yaml` without a name also prints
    /// the MeshConfig.
    Get {
        name: Option<String>,
        /// table; json; yaml: the policy documents themselves (apply-able).
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a policy by `namespace/name` (or `name` in namespace default).
    Delete { name: String },
    /// Every stored revision of a policy: version, time, who, what changed.
    History {
        name: String,
        /// Also print each revision's document.
        #[arg(long)]
        documents: bool,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Per policy: version, mode, and how many of its target's connected proxies applied it.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Why a call would be allowed or denied: decision, reason, matching rule and a trace of
    /// every rule, from the live policies (or --file, offline).
    Explain(super::explain::ExplainArgs),
    /// The least-privilege AccessPolicy for a service from the calls its sidecars saw while its
    /// allow-list only watched (audit mode, or allow-authenticated): review it, then apply it.
    Suggest(super::suggest::SuggestArgs),
    /// Check a golden allow/deny case table against policy files, offline; exits 1 naming
    /// every case that does not hold (for CI pipelines).
    Test {
        /// The case table (YAML: `cases: [{name, from, to, port?, method?, path?, tcp?,
        /// jwt_claims?, expect, reason?}]`).
        #[arg(short = 'f', long = "file")]
        cases: PathBuf,
        /// The policy file or directory to test.
        #[arg(short = 'p', long = "policies")]
        policies: PathBuf,
        #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
        trust_domain: TrustDomain,
    },
    /// Check documents offline, without a control plane.
    Validate {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
        /// Trust domain for short identity forms.
        #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
        trust_domain: TrustDomain,
    },
}

/// Validates every source; on any error prints them all and fails.
fn validate(sources: &[(String, String)], td: &TrustDomain) -> anyhow::Result<Vec<Document>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in sources {
        match parse_new_documents(text, name, td) {
            Ok(mut d) => docs.append(&mut d),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        bail!("{} invalid document(s); nothing was applied", errors.len());
    }
    Ok(docs)
}

pub async fn run(global: &Global, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Explain(args) => super::explain::explain(global, args).await,
        PolicyCmd::Suggest(args) => super::suggest::run(global, args).await,
        PolicyCmd::Test {
            cases,
            policies,
            trust_domain,
        } => super::explain::test(&cases, &policies, &trust_domain),
        PolicyCmd::History {
            name,
            documents,
            output,
        } => history(global, name, documents, output).await,
        PolicyCmd::Status { output } => rollout(global, output).await,
        PolicyCmd::Validate { path, trust_domain } => {
            let docs = validate(&sources(&path)?, &trust_domain)?;
            println!("{} valid document(s)", docs.len());
            Ok(())
        }
        PolicyCmd::Apply { path } => apply(global, &path).await,
        PolicyCmd::Get { name, output } => get(global, name, output).await,
        PolicyCmd::Delete { name } => delete(global, name).await,
    }
}

/// `moat policy history`: every stored revision of one policy.
async fn history(
    global: &Global,
    name: String,
    documents: bool,
    output: Output,
) -> anyhow::Result<()> {
    let revs = admin(global)
        .await?
        .policy_history(PolicyHistoryRequest { name })
        .await
        .map_err(|s| status("policy history", s))?
        .into_inner()
        .revisions;
    let data: Vec<_> = revs
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "version": r.version,
                "time_unix_ms": r.time_unix_ms,
                "change": r.change,
                "by": r.actor,
            });
            if documents {
                v["document"] = r.document.clone().into();
            }
            v
        })
        .collect();
    output.print(&data.into(), || {
        let mut table = Table::new(&["VERSION", "TIME", "CHANGE", "BY"]).right(&[0]);
        for r in &revs {
            let t = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(r.time_unix_ms.max(0) as u64);
            table.row([
                r.version.to_string(),
                humantime::format_rfc3339_millis(t).to_string(),
                r.change.clone(),
                r.actor.clone(),
            ]);
            if documents && !r.document.is_empty() {
                table.detail(r.document.clone());
            }
        }
        table.print();
    })
}

/// `moat policy status`: per policy, its version, mode and how many proxies applied it.
async fn rollout(global: &Global, output: Output) -> anyhow::Result<()> {
    let resp = admin(global)
        .await?
        .list_policies(ListPoliciesRequest {})
        .await
        .map_err(|s| status("policy status", s))?
        .into_inner();
    let none = moat_api::v1::PolicyRollout::default();
    let rows: Vec<_> = resp
        .policies
        .iter()
        .zip(resp.rollout.iter().chain(std::iter::repeat(&none)))
        .collect();
    let data = serde_json::json!({
        "default_posture": resp.default_posture,
        "policies": rows.iter().map(|(p, r)| serde_json::json!({
            "policy": format!("{}/{}", p.namespace, p.name),
            "version": p.version,
            "mode": p.mode,
            "target": p.target,
            "applied": r.applied,
            "proxies": r.proxies,
            // null: applied with `moat policy apply`.
            "managed_by": (!r.managed_by.is_empty()).then_some(&r.managed_by),
            "counters": r.counters.iter().map(|c| serde_json::json!({
                // null: no rule matched.
                "rule": (c.rule >= 0).then_some(c.rule),
                "decision": c.decision,
                "count": c.count,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    output.print(&data, || {
        println!("default posture: {}", resp.default_posture);
        if resp.default_posture == moat_policy::DefaultPosture::AllowAuthenticated.as_str() {
            println!(
                "WARNING: services without a policy accept any authenticated caller (migration mode)"
            );
        }
        let mut table = Table::new(&["POLICY", "VERSION", "MODE", "APPLIED", "TARGET", "MANAGED BY"])
            .right(&[1, 3]);
        for (p, r) in &rows {
            table.row([
                format!("{}/{}", p.namespace, p.name),
                p.version.to_string(),
                p.mode.clone(),
                format!("{}/{}", r.applied, r.proxies),
                p.target.clone(),
                if r.managed_by.is_empty() {
                    "moat policy apply".to_owned()
                } else {
                    format!("kubernetes: {}", r.managed_by)
                },
            ]);
            for c in &r.counters {
                let rule = if c.rule < 0 {
                    "no rule matched".to_owned()
                } else {
                    format!("rule {}", c.rule)
                };
                table.detail(format!("    {rule}: {} {}", c.decision, c.count));
            }
        }
        table.print();
    })
}

/// `moat policy apply`: validate every document locally, then apply them in one request.
async fn apply(global: &Global, path: &Path) -> anyhow::Result<()> {
    let sources = sources(path)?;
    let dir = crate::creds::CredDir::load(&global.credentials)?;
    validate(&sources, dir.credential.id().trust_domain())?;
    let resp = admin(global)
        .await?
        .apply_policies(ApplyPoliciesRequest {
            sources: sources
                .into_iter()
                .map(|(name, text)| PolicySource { name, text })
                .collect(),
        })
        .await
        .map_err(|s| status("policy apply", s))?
        .into_inner();
    for p in &resp.policies {
        println!(
            "applied {}/{} (version {}, target {}, {})",
            p.namespace, p.name, p.version, p.target, p.mode
        );
    }
    if !resp.default_posture.is_empty() {
        println!(
            "applied mesh config (default posture {})",
            resp.default_posture
        );
    }
    Ok(())
}

/// `moat policy get`: the stored policies as a table, YAML or JSON.
async fn get(global: &Global, name: Option<String>, output: Output) -> anyhow::Result<()> {
    let resp = admin(global)
        .await?
        .list_policies(ListPoliciesRequest {})
        .await
        .map_err(|s| status("policy get", s))?
        .into_inner();
    let want = name.map(|n| {
        if n.contains('/') {
            n
        } else {
            format!("default/{n}")
        }
    });
    let chosen: Vec<usize> = (0..resp.policies.len())
        .filter(|i| {
            let p = &resp.policies[*i];
            want.as_ref()
                .is_none_or(|w| *w == format!("{}/{}", p.namespace, p.name))
        })
        .collect();
    if let Some(w) = &want
        && chosen.is_empty()
    {
        bail!("no policy {w}");
    }
    match output {
        Output::Yaml => {
            let docs: Vec<&str> = chosen
                .iter()
                .filter_map(|i| resp.documents.get(*i).map(String::as_str))
                .collect();
            print!("{}", docs.join("---\n"));
            if want.is_none() {
                if !docs.is_empty() {
                    println!("---");
                }
                print!("{}", resp.mesh_document);
            }
        }
        Output::Json => {
            let v: Vec<_> = chosen
                .iter()
                .map(|i| {
                    let p = &resp.policies[*i];
                    serde_json::json!({
                        "namespace": p.namespace, "name": p.name, "version": p.version,
                        "target": p.target, "mode": p.mode, "rules": p.rules.len(),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"default_posture": resp.default_posture, "policies": v})
            );
        }
        Output::Table => {
            println!("default posture: {}", resp.default_posture);
            let mut table =
                Table::new(&["POLICY", "VERSION", "MODE", "RULES", "TARGET"]).right(&[1, 3]);
            for i in chosen {
                let p = &resp.policies[i];
                table.row([
                    format!("{}/{}", p.namespace, p.name),
                    p.version.to_string(),
                    p.mode.clone(),
                    p.rules.len().to_string(),
                    p.target.clone(),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

/// `moat policy delete`.
async fn delete(global: &Global, name: String) -> anyhow::Result<()> {
    admin(global)
        .await?
        .delete_policy(DeletePolicyRequest { name: name.clone() })
        .await
        .map_err(|s| status("policy delete", s))?;
    println!("deleted {name}");
    Ok(())
}
