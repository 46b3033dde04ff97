//! `moat inject`: add the moat sidecar to the workloads of a Kubernetes YAML file, offline. The
//! control plane's admission webhook applies the same `moat_inject` code, so both give the same
//! pod.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use moat_inject::{InjectConfig, Outcome};

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// The manifest (multi-document YAML); `-` reads standard input.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// The sidecar image.
    #[arg(long, env = "MOAT_INJECT_IMAGE")]
    image: Option<String>,
    /// The control-plane URL pods use.
    #[arg(long = "control-plane-url", env = "MOAT_INJECT_CONTROL_PLANE")]
    control_plane_url: Option<String>,
    /// The mesh's trust domain.
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "moat.local")]
    trust_domain: moat_identity::TrustDomain,
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input")?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    let defaults = InjectConfig::default();
    let cfg = InjectConfig {
        proxy_image: args.image.unwrap_or(defaults.proxy_image),
        control_plane: args.control_plane_url.unwrap_or(defaults.control_plane),
        trust_domain: args.trust_domain.to_string(),
        proxy_uid: defaults.proxy_uid,
    };
    let source = args.file.display().to_string();
    let (out, report) =
        moat_inject::inject_yaml(&text, &cfg).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    print!("{out}");
    for (what, outcome) in report {
        match outcome {
            Outcome::NotAWorkload => {}
            Outcome::Injected => eprintln!("{what}: injected"),
            Outcome::AlreadyInjected => eprintln!("{what}: already injected"),
            skipped => eprintln!(
                "{what}: skipped ({})",
                skipped.skipped_because().unwrap_or_default()
            ),
        }
    }
    Ok(())
}
