//! `outpost tokens create|list|revoke`: API tokens with a role. Through the running
//! gateway's API when there is one (so a revoked token stops there at once), else
//! straight in the state database.

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;
use outpost_store::{ApiToken, Role, Store};

use super::client;
use crate::config::Config;
use crate::state_dir::running_gateway;

#[derive(Debug, Subcommand)]
pub(crate) enum TokensCommand {
    /// Make a token; it is printed once, only its hash is kept.
    Create {
        /// viewer (reads), operator (runs the site; not handlers or tokens), admin.
        #[arg(long)]
        role: Role,
        /// A unique name: who or what holds it (grafana, night-shift, ...).
        #[arg(long)]
        name: String,
    },
    /// List the tokens: names, roles, when made.
    List {
        /// Print JSON (the same shape as GET /api/v1/tokens).
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// Runs a `tokens` subcommand.
pub(crate) async fn run(command: TokensCommand, config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    if running_gateway(&config.gateway.state_dir)?.is_some() {
        return online(command, config_path).await;
    }
    std::fs::create_dir_all(&config.gateway.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            config.gateway.state_dir.display()
        )
    })?;
    let store = Store::open(config.database_path()).await?;
    let result = offline(command, &store).await;
    store.close().await?;
    result
}

async fn online(command: TokensCommand, config_path: &Path) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create { role, name } => {
            let body = serde_json::json!({ "name": name, "role": role });
            let answer =
                client::call(config_path, Method::POST, "/api/v1/tokens", Some(body)).await?;
            created(&name, role, answer["token"].as_str().unwrap_or_default())?;
        }
        TokensCommand::List { json } => {
            let answer = client::call(config_path, Method::GET, "/api/v1/tokens", None).await?;
            let tokens: Vec<Listed> = serde_json::from_value(answer["tokens"].clone())
                .context("the gateway's token list")?;
            list(&tokens, json)?;
        }
        TokensCommand::Revoke { name } => {
            client::call(
                config_path,
                Method::DELETE,
                &format!("/api/v1/tokens/{name}"),
                None,
            )
            .await?;
            outln!("Revoked the token {name:?} in the running gateway.");
        }
    }
    Ok(())
}

async fn offline(command: TokensCommand, store: &Store) -> anyhow::Result<()> {
    match command {
        TokensCommand::Create { role, name } => {
            let token = store.create_api_token(&name, role).await?;
            created(&name, role, &token)?;
        }
        TokensCommand::List { json } => {
            let tokens: Vec<Listed> = store
                .list_api_tokens()
                .await?
                .into_iter()
                .map(Listed::from)
                .collect();
            list(&tokens, json)?;
        }
        TokensCommand::Revoke { name } => {
            if !store.revoke_api_token(&name).await? {
                anyhow::bail!("no token named {name:?}");
            }
            outln!("Revoked the token {name:?}.");
        }
    }
    Ok(())
}

/// A token as listed, from the API or the store.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct Listed {
    name: String,
    role: Role,
    created_at: i64,
}

impl From<ApiToken> for Listed {
    fn from(t: ApiToken) -> Self {
        Self {
            name: t.name,
            role: t.role,
            created_at: t.created_at,
        }
    }
}

fn created(name: &str, role: Role, token: &str) -> anyhow::Result<()> {
    outln!(
        "API token {name:?} ({role}), shown once; send it as Authorization: Bearer <token>:\n\n    {token}"
    );
    Ok(())
}

fn list(tokens: &[Listed], json: bool) -> anyhow::Result<()> {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "tokens": tokens }))?
        );
        return Ok(());
    }
    outln!("{} token(s)", tokens.len());
    for token in tokens {
        let made = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(token.created_at).unwrap_or(0)),
        );
        outln!("  {:<24} {:<9} made {made}", token.name, token.role);
    }
    Ok(())
}
