//! `moat-proxy init`: the interception rules an injected pod's init container installs. The
//! pod's inbound TCP goes to the inbound listener and its outbound TCP to the transparent
//! listener, except the proxy's own traffic (by uid), loopback, the proxy's ports and the ports
//! named to skip. Runs `iptables` (the nft or legacy variant, whichever the node uses) in the
//! pod's network namespace; running it again replaces the rules rather than adding to them.

use std::process::Command;

/// Chains moat owns in the nat table.
const INBOUND: &str = "MOAT_INBOUND";
const OUTBOUND: &str = "MOAT_OUTPUT";

#[derive(clap::Parser, Debug)]
#[command(
    name = "moat-proxy init",
    about = "Install the pod's traffic interception rules"
)]
pub struct InitArgs {
    /// The uid the sidecar runs as: its own connections are never intercepted.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The sidecar's inbound (mTLS) listener port.
    #[arg(long, default_value_t = 7143)]
    pub inbound_port: u16,
    /// The sidecar's transparent outbound listener port.
    #[arg(long, default_value_t = 7140)]
    pub outbound_port: u16,
    /// Inbound ports left alone (comma-separated), e.g. the admin port and health probes.
    #[arg(long, value_delimiter = ',', default_value = "7191")]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// The iptables command to use (default: detect nft or legacy).
    #[arg(long)]
    pub iptables: Option<String>,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

/// One `iptables -t nat …` invocation; `may_fail` ones are clean-ups of a previous run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub args: Vec<String>,
    pub may_fail: bool,
}

fn step(args: &[&str]) -> Step {
    Step {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        may_fail: false,
    }
}

/// The commands, in order.
pub fn plan(a: &InitArgs) -> Vec<Step> {
    let inbound = a.inbound_port.to_string();
    let outbound = a.outbound_port.to_string();
    let uid = a.proxy_uid.to_string();
    let mut steps = Vec::new();
    // Unhook and empty our chains from an earlier run (they may not exist yet).
    for (hook, chain) in [("PREROUTING", INBOUND), ("OUTPUT", OUTBOUND)] {
        steps.push(Step {
            may_fail: true,
            ..step(&["-D", hook, "-p", "tcp", "-j", chain])
        });
        steps.push(Step {
            may_fail: true,
            ..step(&["-N", chain])
        });
        steps.push(step(&["-F", chain]));
    }
    // Inbound: mesh traffic to the sidecar and skipped ports pass; every other TCP connection
    // to the pod goes to the sidecar, which accepts only mutual TLS.
    steps.push(step(&[
        "-A", INBOUND, "-p", "tcp", "--dport", &inbound, "-j", "RETURN",
    ]));
    for p in &a.skip_inbound_ports {
        steps.push(step(&[
            "-A",
            INBOUND,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    steps.push(step(&[
        "-A",
        INBOUND,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound,
    ]));
    // Outbound: the sidecar's own connections and loopback pass; so do skipped ports.
    steps.push(step(&[
        "-A",
        OUTBOUND,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]));
    steps.push(step(&["-A", OUTBOUND, "-o", "lo", "-j", "RETURN"]));
    for p in &a.skip_outbound_ports {
        steps.push(step(&[
            "-A",
            OUTBOUND,
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ]));
    }
    steps.push(step(&[
        "-A",
        OUTBOUND,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound,
    ]));
    steps.push(step(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND]));
    steps.push(step(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTBOUND]));
    steps
}

fn rule_count(bin: &str) -> Option<usize> {
    let out = Command::new(format!("{bin}-save")).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A"))
            .count()
    })
}

fn exists(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why the interception rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--inbound-port and --outbound-port must differ")]
    SamePorts,
    #[error(
        "no iptables found (iptables-nft, iptables-legacy or iptables): the init container image must include iptables"
    )]
    NoIptables,
    #[error("cannot run {bin}: {source}")]
    Run { bin: String, source: std::io::Error },
    #[error(
        "{bin} -t nat {rule} failed: {stderr} (the init container needs NET_ADMIN and NET_RAW)"
    )]
    Rule {
        bin: String,
        rule: String,
        stderr: String,
    },
}

/// The iptables variant the node uses: the one that already holds rules (kube-proxy's), else
/// nft, else plain `iptables`.
fn detect() -> Result<String, InitError> {
    let nft = exists("iptables-nft");
    let legacy = exists("iptables-legacy");
    match (nft, legacy) {
        (true, true) => {
            let (n, l) = (rule_count("iptables-nft"), rule_count("iptables-legacy"));
            Ok(if l.unwrap_or(0) > n.unwrap_or(0) {
                "iptables-legacy".into()
            } else {
                "iptables-nft".into()
            })
        }
        (true, false) => Ok("iptables-nft".into()),
        (false, true) => Ok("iptables-legacy".into()),
        (false, false) if exists("iptables") => Ok("iptables".into()),
        (false, false) => Err(InitError::NoIptables),
    }
}

/// Installs the rules.
pub fn run(a: &InitArgs) -> Result<(), InitError> {
    if a.inbound_port == a.outbound_port {
        return Err(InitError::SamePorts);
    }
    let steps = plan(a);
    if a.dry_run {
        let bin = a.iptables.as_deref().unwrap_or("iptables");
        for s in &steps {
            println!("{bin} -t nat {}", s.args.join(" "));
        }
        return Ok(());
    }
    let bin = match &a.iptables {
        Some(b) => b.clone(),
        None => detect()?,
    };
    for s in &steps {
        let out = Command::new(&bin)
            .args(["-w", "5", "-t", "nat"])
            .args(&s.args)
            .output()
            .map_err(|source| InitError::Run {
                bin: bin.clone(),
                source,
            })?;
        if !out.status.success() && !s.may_fail {
            return Err(InitError::Rule {
                bin,
                rule: s.args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
    }
    tracing::info!(iptables = %bin, inbound = a.inbound_port, outbound = a.outbound_port, proxy_uid = a.proxy_uid, "interception rules installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn the_plan_exempts_the_proxy_and_redirects_the_rest() {
        let a = InitArgs::parse_from(["init", "--skip-outbound-ports", "53,5432"]);
        let text: Vec<String> = plan(&a).iter().map(|s| s.args.join(" ")).collect();
        let at = |needle: &str| {
            text.iter()
                .position(|l| l == needle)
                .unwrap_or_else(|| panic!("{needle} missing: {text:#?}"))
        };
        let uid = at("-A MOAT_OUTPUT -m owner --uid-owner 1337 -j RETURN");
        let redirect = at("-A MOAT_OUTPUT -p tcp -j REDIRECT --to-ports 7140");
        assert!(uid < redirect && at("-A MOAT_OUTPUT -p tcp --dport 5432 -j RETURN") < redirect);
        assert!(
            at("-A MOAT_INBOUND -p tcp --dport 7191 -j RETURN")
                < at("-A MOAT_INBOUND -p tcp -j REDIRECT --to-ports 7143")
        );
        // Re-running unhooks before hooking again, so the rules never pile up.
        assert!(at("-D OUTPUT -p tcp -j MOAT_OUTPUT") < at("-A OUTPUT -p tcp -j MOAT_OUTPUT"));
    }
}
