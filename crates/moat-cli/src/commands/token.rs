//! `moat token create|list|revoke`.

use clap::Subcommand;
use moat_api::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo};

use super::{admin, duration, time};
use crate::Global;
use crate::connect::status;
use crate::output::Output;
use crate::table::Table;

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join token bound to one identity. Prints only the token on stdout, once.
    Create {
        /// Identity: `orders`, `shop/orders` or a full spiffe:// ID.
        #[arg(long)]
        identity: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: std::time::Duration,
        /// How many certificates the token may obtain.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        uses: u32,
    },
    /// List join tokens (their ids and state, never the tokens).
    List {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a join token by id.
    Revoke {
        /// The token id (16 hex digits, from `moat token list`).
        id: String,
    },
}

fn json(t: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "spiffe_id": t.spiffe_id, "created": time(t.created_unix),
        "expires": time(t.expires_unix), "max_uses": t.max_uses, "uses": t.uses, "revoked": t.revoked,
    })
}

pub async fn run(global: &Global, cmd: TokenCmd) -> anyhow::Result<()> {
    let mut client = admin(global).await?;
    match cmd {
        TokenCmd::Create {
            identity,
            ttl,
            uses,
        } => {
            let r = client
                .create_token(CreateTokenRequest {
                    identity,
                    ttl_seconds: ttl.as_secs(),
                    max_uses: uses,
                })
                .await
                .map_err(|s| status("token create", s))?
                .into_inner();
            if let Some(i) = r.info {
                eprintln!(
                    "token {} for {} (uses: {}, expires {}); it is shown only now",
                    i.id,
                    i.spiffe_id,
                    i.max_uses,
                    time(i.expires_unix)
                );
            }
            println!("{}", r.token);
        }
        TokenCmd::List { output } => {
            let tokens = client
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(|s| status("token list", s))?
                .into_inner()
                .tokens;
            if !output.is_table() {
                let data = serde_json::Value::Array(tokens.iter().map(json).collect());
                output.print(&data, || {})?;
            } else {
                let mut table =
                    Table::new(&["ID", "IDENTITY", "USES", "EXPIRES", "STATE"]).right(&[2]);
                for t in &tokens {
                    let state = if t.revoked {
                        "revoked"
                    } else if t.uses >= t.max_uses {
                        "used"
                    } else {
                        "active"
                    };
                    table.row([
                        t.id.clone(),
                        t.spiffe_id.clone(),
                        format!("{}/{}", t.uses, t.max_uses),
                        time(t.expires_unix),
                        state.to_owned(),
                    ]);
                }
                table.print();
            }
        }
        TokenCmd::Revoke { id } => {
            let r = client
                .revoke_token(RevokeTokenRequest { id })
                .await
                .map_err(|s| status("token revoke", s))?
                .into_inner();
            if let Some(i) = r.info {
                println!("revoked token {} for {}", i.id, i.spiffe_id);
            }
        }
    }
    Ok(())
}
