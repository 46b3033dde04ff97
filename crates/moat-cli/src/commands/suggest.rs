//! `moat policy suggest --for SERVICE`: fetches what the service's sidecars observed while its
//! allow-list only watched (Admin `ObservedTraffic`), turns it into an enforcing AccessPolicy
//! with `moat_policy::suggest`, checks that the result parses as a policy, and prints it.
//! Warnings go to stderr, so `> policy.yaml` keeps only the document.

use std::time::Duration;

use anyhow::{Context as _, bail};
use moat_api::v1::ObservedTrafficRequest;
use moat_identity::SpiffeId;
use moat_policy::suggest::{ObservedCall, PolicyKey, suggest};

use super::{admin, duration};
use crate::Global;
use crate::connect::status;

#[derive(clap::Args, Debug)]
pub struct SuggestArgs {
    /// The service: `orders`, `shop/orders` or a SPIFFE ID.
    #[arg(long = "for")]
    service: String,
    /// Only calls seen this recently (e.g. 1h); default: everything the connected sidecars saw.
    #[arg(long, value_parser = duration)]
    since: Option<Duration>,
    /// Warn about callers seen fewer times than this.
    #[arg(long, default_value_t = 10)]
    min_calls: u64,
}

pub async fn run(global: &Global, args: SuggestArgs) -> anyhow::Result<()> {
    let since_seconds = match args.since {
        None => 0,
        Some(d) => u32::try_from(d.as_secs().max(1)).context("--since is too long")?,
    };
    let resp = admin(global)
        .await?
        .observed_traffic(ObservedTrafficRequest {
            target: args.service.clone(),
            since_seconds,
        })
        .await
        .map_err(|s| status("policy suggest", s))?
        .into_inner();
    let target: SpiffeId = resp
        .target
        .parse()
        .context("the control plane named an invalid target")?;
    if resp.proxies == 0 {
        bail!(
            "no sidecar of {target} is connected: the calls are counted by its sidecars, so start them (with the policy in audit mode) and send traffic first"
        );
    }
    match resp.watching.as_str() {
        "audit" | "allow-authenticated" => {}
        other => eprintln!(
            "warning: {target}'s allow-list is in {other} mode now, so its sidecars are not recording calls; what follows is what they saw before, if anything. Apply its policy with `mode: audit` to observe"
        ),
    }
    let key = match resp.policy.split_once('/') {
        Some((namespace, name)) => PolicyKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        None => PolicyKey::for_target(&target),
    };
    let calls: Vec<ObservedCall> = resp
        .calls
        .into_iter()
        .map(|c| {
            Ok(ObservedCall {
                peer: c.peer,
                port: u16::try_from(c.port).context("the control plane sent a bad port")?,
                method: c.method,
                path: c.path,
                count: c.count,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let s = suggest(&target, &key, &calls, args.min_calls);
    // What is printed must be a policy `moat policy apply` takes.
    moat_policy::parse_new_documents(&s.yaml, "the suggestion", target.trust_domain()).map_err(
        |errors| {
            anyhow::anyhow!(
                "the suggestion does not parse as a policy (a bug; please report it): {errors:?}"
            )
        },
    )?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", s.yaml);
    Ok(())
}
