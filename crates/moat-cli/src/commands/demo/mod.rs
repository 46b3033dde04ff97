//! `moat demo`: a whole zero-trust mesh on loopback, as real processes: the control plane on the
//! embedded store, three ordinary services (`frontend` → `orders` → `payments`, over HTTP and
//! gRPC) each behind its own `moat-proxy`, and an unmeshed intruder. It applies the example
//! allow-list and narrates checks that must hold: every check is a real request, and `--no-wait`
//! exits non-zero when any of them fails.
//!
//! `procs` starts and stops the processes; `steps` holds the narrated checks; `http` is the
//! plain HTTP both use to ask the processes.

mod http;
mod procs;
mod steps;

use std::path::PathBuf;

use procs::Mesh;
use tokio::signal::unix::{SignalKind, signal};

/// Flags of `moat demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run the narration and exit (0 only if every check held) instead of leaving the mesh up.
    #[arg(long)]
    no_wait: bool,
    /// Working directory for data, logs and credentials (default: a new temporary directory,
    /// removed on exit).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Testing only: apply an allow-everything mesh config instead of the example allow-list,
    /// to prove the narration's checks fail when enforcement is broken.
    #[arg(long, hide = true)]
    break_enforcement: bool,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (dir, temporary) = match args.dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("moat-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)?;
    // Ctrl-C is taken over before the first process starts, so that an interrupt at any moment
    // (even right after "Press Ctrl-C" is printed) stops the mesh cleanly instead of killing
    // this process and orphaning its children.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let bins = procs::binaries().await?;
    let mut mesh = Mesh::new(bins, dir.clone());
    let result = tokio::select! {
        r = async {
            mesh.start().await?;
            let passed = steps::narrate(&mut mesh, args.break_enforcement).await;
            anyhow::Ok(passed)
        } => Some(r),
        _ = interrupt.recv() => None,
    };
    let passed = match result {
        Some(Ok(p)) => p,
        None => {
            println!("\nInterrupted; stopping…");
            mesh.stop().await;
            if temporary {
                let _ = std::fs::remove_dir_all(&dir);
            }
            anyhow::bail!("interrupted before the demo's checks finished");
        }
        Some(Err(e)) => {
            eprintln!(
                "\n  ✗ the demo could not start: {e:#}\n    logs: {}",
                dir.display()
            );
            mesh.stop().await;
            anyhow::bail!("the demo failed to start");
        }
    };
    if passed && !args.no_wait {
        steps::try_it_yourself(&mesh);
        println!("\nThe mesh is running. Press Ctrl-C to stop it.");
        interrupt.recv().await;
        println!("\nStopping…");
    }
    mesh.stop().await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if passed {
        println!("Done: every process stopped.");
        Ok(())
    } else {
        anyhow::bail!("some demo checks failed (logs were in {})", dir.display())
    }
}
