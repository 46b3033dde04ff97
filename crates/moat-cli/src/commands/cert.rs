//! `moat cert issue|request|renew|inspect`. Keys are always generated here, in the CLI; only
//! CSRs go to the control plane.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use moat_api::v1::identity_client::IdentityClient;
use moat_api::v1::{CertifyRequest, CertifyResponse, IssueCertificateRequest, certify_request};
use moat_identity::{
    CertInfo, SpiffeId, TrustBundle, TrustDomain, Usage, WorkloadKey, verify_chain,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{admin, duration, time};
use crate::Global;
use crate::connect::{self, status};
use crate::creds::{self, CredDir};
use crate::output::Output;

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Issue a certificate for any identity with the admin credential (gateways, debugging).
    Issue {
        /// Identity: `orders`, `shop/orders` or a full spiffe:// ID.
        #[arg(long)]
        identity: String,
        /// Lifetime (5m to 24h); the control plane's default when omitted.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Directory to write cert.pem, key.pem and bundle.pem to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Obtain a first certificate with a join token (what a sidecar does at start).
    Request {
        /// The identity the token is bound to.
        #[arg(long)]
        identity: String,
        /// File holding the join token.
        #[arg(long)]
        token_file: PathBuf,
        /// PEM file of the roots to trust the control plane by (`moat ca bundle`).
        #[arg(long)]
        trust_anchors: PathBuf,
        /// Trust domain for short identity forms and the control plane's identity.
        #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
        trust_domain: TrustDomain,
        /// Lifetime (5m to 24h); the control plane's default when omitted.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Directory to write cert.pem, key.pem and bundle.pem to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Renew the certificate in a credential directory over mutual TLS, with a new key.
    Renew {
        /// The credential directory to renew in place.
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime (5m to 24h); the control plane's default when omitted.
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
    },
    /// Tell the proxies of an identity (or all) to re-key and renew now; waits until every one
    /// reports a new certificate.
    Rotate {
        /// Identity whose proxies rotate.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        identity: Option<String>,
        /// Every connected proxy.
        #[arg(long)]
        all: bool,
        /// How long to wait for the new certificates.
        #[arg(long, default_value = "60s", value_parser = duration)]
        timeout: Duration,
    },
    /// Show the subject, SPIFFE ID, validity and issuer of every certificate in a PEM file.
    Inspect {
        /// PEM file (a chain or a bundle).
        file: PathBuf,
        /// Also verify the chain against this bundle.
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
}

fn ttl_seconds(ttl: Option<Duration>) -> anyhow::Result<u32> {
    match ttl {
        None => Ok(0),
        Some(d) => u32::try_from(d.as_secs()).context("--ttl is too long"),
    }
}

/// Checks what the control plane returned against our own trust anchors and the identity we
/// asked for, then writes it.
fn accept(
    resp: CertifyResponse,
    id: &SpiffeId,
    key: &WorkloadKey,
    anchors: &TrustBundle,
    out: &Path,
) -> anyhow::Result<()> {
    let chain: Vec<CertificateDer<'static>> = resp
        .chain_der
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let peer = verify_chain(
        &chain,
        anchors,
        id.trust_domain(),
        UnixTime::now(),
        Usage::Client,
    )
    .context(
        "the control plane returned a certificate that does not verify against the trust anchors",
    )?;
    if &peer.id != id {
        bail!(
            "the control plane returned a certificate for {}, not the {id} we asked for",
            peer.id
        );
    }
    creds::write(
        out,
        &resp.chain_der,
        &key.private_key_pem(),
        &resp.trust_bundle_der,
    )?;
    println!(
        "wrote {} (identity {}, serial {}, expires {}, renew after {})",
        out.display(),
        peer.id,
        resp.serial,
        time(resp.not_after_unix),
        time(resp.refresh_after_unix)
    );
    Ok(())
}

pub async fn run(global: &Global, cmd: CertCmd) -> anyhow::Result<()> {
    match cmd {
        CertCmd::Issue { identity, ttl, out } => {
            let dir = CredDir::load(&global.credentials)?;
            let id = SpiffeId::parse_with_default(&identity, dir.credential.id().trust_domain())?;
            let key = WorkloadKey::generate(&id)?;
            let resp = admin(global)
                .await?
                .issue_certificate(IssueCertificateRequest {
                    csr_der: key.csr_der().to_vec(),
                    ttl_seconds: ttl_seconds(ttl)?,
                })
                .await
                .map_err(|s| status("cert issue", s))?
                .into_inner();
            accept(resp, &id, &key, &dir.bundle, &out)
        }
        CertCmd::Request {
            identity,
            token_file,
            trust_anchors,
            trust_domain,
            ttl,
            out,
        } => {
            let id = SpiffeId::parse_with_default(&identity, &trust_domain)?;
            let token = std::fs::read_to_string(&token_file)
                .with_context(|| format!("cannot read the token file {}", token_file.display()))?;
            let token = token.trim();
            if token.is_empty() {
                bail!("the token file {} is empty", token_file.display());
            }
            let anchors = creds::read_bundle(&trust_anchors)?;
            let key = WorkloadKey::generate(&id)?;
            let channel =
                connect::channel(&global.control_plane, anchors.clone(), &trust_domain, None)
                    .await?;
            let resp = IdentityClient::new(channel)
                .certify(CertifyRequest {
                    csr_der: key.csr_der().to_vec(),
                    ttl_seconds: ttl_seconds(ttl)?,
                    credential: Some(certify_request::Credential::JoinToken(token.to_owned())),
                })
                .await
                .map_err(|s| status("cert request", s))?
                .into_inner();
            accept(resp, &id, &key, &anchors, &out)
        }
        CertCmd::Renew { dir, ttl } => {
            let current = CredDir::load(&dir)?;
            let id = current.credential.id().clone();
            let key = WorkloadKey::generate(&id)?;
            let channel = connect::channel(
                &global.control_plane,
                current.bundle.clone(),
                id.trust_domain(),
                Some(&current.credential),
            )
            .await?;
            let resp = IdentityClient::new(channel)
                .certify(CertifyRequest {
                    csr_der: key.csr_der().to_vec(),
                    ttl_seconds: ttl_seconds(ttl)?,
                    credential: None,
                })
                .await
                .map_err(|s| status("cert renew", s))?
                .into_inner();
            accept(resp, &id, &key, &current.bundle, &dir)
        }
        CertCmd::Inspect {
            file,
            bundle,
            output,
        } => inspect(&file, bundle.as_deref(), output),
        CertCmd::Rotate {
            identity,
            all,
            timeout,
        } => rotate(global, identity, all, timeout).await,
    }
}

async fn rotate(
    global: &Global,
    identity: Option<String>,
    all: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    use moat_api::v1::{ListProxiesRequest, RotateCertificatesRequest};
    let mut client = admin(global).await?;
    let dir = CredDir::load(&global.credentials)?;
    let want = match &identity {
        Some(i) => {
            Some(SpiffeId::parse_with_default(i, dir.credential.id().trust_domain())?.to_string())
        }
        None => None,
    };
    let list = |c: &mut moat_api::v1::admin_client::AdminClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move {
            c.list_proxies(ListProxiesRequest {})
                .await
                .map(|r| r.into_inner().proxies)
                .map_err(|s| status("cert rotate", s))
        }
    };
    let matches = |p: &moat_api::v1::ProxyStatus| want.as_ref().is_none_or(|w| &p.spiffe_id == w);
    let before: Vec<(String, String, String)> = list(&mut client)
        .await?
        .into_iter()
        .filter(|p| matches(p))
        .map(|p| (p.spiffe_id, p.inbound_address, p.cert_serial))
        .collect();
    if before.is_empty() {
        bail!(
            "no connected proxy matches {}",
            want.as_deref().unwrap_or("--all")
        );
    }
    let told = client
        .rotate_certificates(RotateCertificatesRequest {
            identity: identity.unwrap_or_default(),
            all,
        })
        .await
        .map_err(|s| status("cert rotate", s))?
        .into_inner()
        .proxies;
    println!("asked {told} proxies to re-key and renew; waiting for their new certificates…");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now: Vec<_> = list(&mut client).await?;
        let mut pending = Vec::new();
        let mut done = Vec::new();
        for (id, addr, old) in &before {
            match now
                .iter()
                .find(|p| &p.spiffe_id == id && &p.inbound_address == addr)
            {
                Some(p) if &p.cert_serial != old => {
                    done.push(format!("{id} {addr}: {old} → {}", p.cert_serial))
                }
                Some(_) => pending.push(format!("{id} {addr}")),
                None => pending.push(format!("{id} {addr} (disconnected)")),
            }
        }
        if pending.is_empty() {
            for d in done {
                println!("  ✓ {d}");
            }
            println!("all {} rotated", before.len());
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            for d in done {
                println!("  ✓ {d}");
            }
            for p in &pending {
                println!("  ✗ {p}: no new certificate yet");
            }
            bail!(
                "{} of {} proxies did not rotate within {}s",
                pending.len(),
                before.len(),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn inspect(file: &Path, bundle: Option<&Path>, output: Output) -> anyhow::Result<()> {
    let pem = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not valid PEM", file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no CERTIFICATE block", file.display());
    }
    let infos = certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            CertInfo::from_der(der)
                .with_context(|| format!("certificate {i} in {}", file.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let verified = match bundle {
        Some(bundle) => {
            let b = creds::read_bundle(bundle)?;
            // Inspection checks the chain in the trust domain the leaf itself names.
            let domain = infos[0]
                .spiffe_id
                .as_ref()
                .map_err(|e| anyhow::anyhow!("the first certificate has no SPIFFE ID: {e}"))?
                .trust_domain()
                .clone();
            let peer = verify_chain(&certs, &b, &domain, UnixTime::now(), Usage::Client)
                .with_context(|| {
                    format!("the chain does not verify against {}", bundle.display())
                })?;
            Some((peer.id, bundle))
        }
        None => None,
    };
    let data = serde_json::json!({
        "certificates": infos.iter().map(|c| serde_json::json!({
            "subject": c.subject,
            "issuer": c.issuer,
            "spiffe_id": c.spiffe_id.as_ref().ok().map(|id| id.to_string()),
            "serial": c.serial,
            "not_before_unix": c.not_before,
            "not_after_unix": c.not_after,
            "key_algorithm": c.key_algorithm,
            "is_ca": c.is_ca,
            "other_sans": c.other_sans,
            "sha256": c.sha256,
        })).collect::<Vec<_>>(),
        "verified": verified.as_ref().map(|(id, bundle)| serde_json::json!({
            "spiffe_id": id.to_string(),
            "bundle": bundle.display().to_string(),
        })),
    });
    output.print(&data, || {
        for (i, c) in infos.iter().enumerate() {
            if i > 0 {
                println!();
            }
            println!("certificate  {i}");
            println!("subject      {}", c.subject);
            println!("issuer       {}", c.issuer);
            match &c.spiffe_id {
                Ok(id) => println!("spiffe id    {id}"),
                Err(why) => println!("spiffe id    none ({why})"),
            }
            println!("serial       {}", c.serial);
            println!(
                "valid        {} .. {}",
                time(c.not_before),
                time(c.not_after)
            );
            println!("key          {}", c.key_algorithm);
            println!("ca           {}", c.is_ca);
            if !c.other_sans.is_empty() {
                println!("other sans   {}", c.other_sans.join(", "));
            }
            println!("sha256       {}", c.sha256);
        }
        if let Some((id, bundle)) = &verified {
            println!("\nverified     {id} against {}", bundle.display());
        }
    })
}
