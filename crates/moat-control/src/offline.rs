//! `moat-control ca …`: repairing the CA with the control plane stopped, for the cases the
//! running control plane cannot fix by itself (see `recovery`): an imported intermediate that
//! expired, or an expired root. Each command reads the stored CA state, computes the next one
//! with the same `moat_ca` steps the online rotation uses, proves it loads, and stores it with
//! compare-and-swap.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use moat_ca::{CertificateAuthority, Health, RotateAt};
use moat_store::{EmbeddedStore, Store};

use crate::ca;
use crate::kek_source::KekSource;

/// What to do.
#[derive(Debug)]
pub enum Action {
    Status,
    /// A new intermediate under the held root, or the operator's (certificate, key) files.
    RotateIntermediate {
        import: Option<(PathBuf, PathBuf)>,
    },
    RotateRoot,
}

/// One offline command.
#[derive(Debug)]
pub struct Command {
    pub data_dir: PathBuf,
    pub kek: KekSource,
    pub action: Action,
}

fn open_store(cmd: &Command) -> anyhow::Result<Arc<dyn Store>> {
    if !cmd.data_dir.join("moat.redb").exists() {
        bail!(
            "{} holds no control-plane store (moat.redb): pass the --data-dir the control plane runs with",
            cmd.data_dir.display()
        );
    }
    let store = EmbeddedStore::open(&cmd.data_dir).with_context(|| {
        format!(
            "cannot open the store in {} (stop the control plane first: it holds the store open unless it is in recovery mode)",
            cmd.data_dir.display()
        )
    })?;
    Ok(Arc::new(store))
}

fn describe(ca: &CertificateAuthority) {
    for r in ca.roots_info() {
        println!(
            "root          {} sha256 {} expires {} (unix)",
            r.subject, r.sha256, r.not_after
        );
    }
    if let Some(i) = ca.intermediate_info() {
        println!(
            "intermediate  {} sha256 {} expires {} (unix)",
            i.subject, i.sha256, i.not_after
        );
    }
}

/// Runs `cmd`, printing what it did.
pub async fn run(cmd: Command) -> anyhow::Result<()> {
    if cmd.kek.dev && cmd.kek.file.is_none() && cmd.kek.inline.is_none() {
        let dev = cmd.data_dir.join("dev.kek");
        if !dev.exists() {
            bail!(
                "--dev: there is no development key {} to unlock this CA",
                dev.display()
            );
        }
    }
    let kek = cmd.kek.load(&cmd.data_dir)?;
    let store = open_store(&cmd)?;
    let (state, rev) = ca::read_state(&store).await?;
    let now = moat_identity::clock::unix_now();
    match &cmd.action {
        Action::Status => {
            match state.health(now, RotateAt::DEFAULT)? {
                Health::Issuing {
                    rotate_at: Some(at),
                } => {
                    println!(
                        "status        issuing; the intermediate rotates automatically at {at} (unix)"
                    );
                }
                Health::Issuing { rotate_at: None } => {
                    println!(
                        "status        issuing; no automatic rotation is possible (see the expiry dates)"
                    );
                }
                Health::RotateIntermediate { expired, .. } => println!(
                    "status        the intermediate {}; the control plane replaces it when it starts",
                    if expired {
                        "has expired"
                    } else {
                        "is due for rotation"
                    }
                ),
                Health::Stuck(why) => println!("status        cannot issue: {why}"),
            }
            let roots = &state.roots_pem;
            println!("roots         {}", roots.len());
            match CertificateAuthority::load(&state, &kek) {
                Ok(ca) => describe(&ca),
                Err(e) => println!("load          {e}"),
            }
            Ok(())
        }
        Action::RotateIntermediate { import } => {
            let next = match import {
                Some((cert, key)) => {
                    let read = |p: &PathBuf| {
                        std::fs::read_to_string(p)
                            .with_context(|| format!("cannot read {}", p.display()))
                    };
                    state.replace_intermediate(&read(cert)?, &read(key)?, &kek)?
                }
                None => state.rotate_intermediate(&kek)?,
            };
            let ca = ca::write_state(&store, &next, rev, &kek).await?;
            println!(
                "replaced the issuing intermediate; start the control plane and every sidecar renews from it"
            );
            describe(&ca);
            Ok(())
        }
        Action::RotateRoot => {
            let root_expired = matches!(
                state.health(now, RotateAt::DEFAULT)?,
                Health::Stuck(moat_ca::Stuck::RootExpired { .. })
            );
            if root_expired {
                let next = state.replace_root(&kek)?;
                let ca = ca::write_state(&store, &next, rev, &kek).await?;
                println!("the root had expired: replaced the root and the intermediate");
                println!(
                    "every sidecar must now be given the new trust bundle (their old root cannot vouch for it):"
                );
                println!(
                    "the control plane writes it to {}/admin/bundle.pem when it starts, and publishes it with --publish-bundle on Kubernetes",
                    cmd.data_dir.display()
                );
                describe(&ca);
                print!("{}", ca.bundle().to_pem());
                return Ok(());
            }
            if let Some(r) = &state.root_rotation {
                bail!(
                    "a root rotation is already in progress ({}) and the current root is still valid: start the control plane and continue it with `moat ca rotate-root`",
                    r.phase.as_str()
                );
            }
            let next = state.begin_root_rotation(&kek)?;
            let ca = ca::write_state(&store, &next, rev, &kek).await?;
            println!(
                "step 1 of the root rotation: the new root joins the trust bundle; issuance is unchanged"
            );
            println!(
                "start the control plane and continue with `moat ca rotate-root` once every proxy has the new bundle"
            );
            describe(&ca);
            Ok(())
        }
    }
}
