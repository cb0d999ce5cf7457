//! `gateway keys`: the operator command that rotates the at-rest key ring.
//!
//! The file edits (`add`, `promote`, `retire`) work on the key file alone, written whole
//! with mode 0600 and renamed into place; the rest talk to a running gateway's admin port
//! (`/admin/keys`). A rotation, in order (docs/operations.md says why each step waits for
//! the one before):
//!
//! 1. `gateway keys add --file F`: a new key, not yet primary; every process reloads it.
//! 2. `gateway keys promote --file F <id>`: new messages are sealed with it.
//! 3. `gateway keys reencrypt`: old rows are sealed again, in the background.
//! 4. `gateway keys retire --file F <old id>`: refused until a pass under the current
//!    primary has finished.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use storage::crypto;

/// Rotates the at-rest key ring.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Append a new random key to the key file without making it primary; prints its id.
    Add {
        #[command(flatten)]
        file: KeyFile,
    },
    /// Make a key of the file the primary one (it seals new messages).
    Promote {
        #[command(flatten)]
        file: KeyFile,
        /// The key id.
        id: u32,
    },
    /// Remove a key from the file. Refused while it is primary, and unless the gateway at
    /// `--admin` finished a re-encryption pass under the file's primary key (`--force`
    /// skips that check: rows still sealed with the key become unreadable).
    Retire {
        #[command(flatten)]
        file: KeyFile,
        /// The key id.
        id: u32,
        #[command(flatten)]
        admin: AdminPort,
        /// Retire without asking the gateway.
        #[arg(long)]
        force: bool,
    },
    /// Ask a gateway to read its key file again now (as SIGHUP does); prints its ring.
    Reload {
        #[command(flatten)]
        admin: AdminPort,
    },
    /// A gateway's key ring and its last re-encryption pass.
    Status {
        #[command(flatten)]
        admin: AdminPort,
    },
    /// Start a pass on a gateway that seals every stored message body again with the
    /// primary key, and follow its progress until it ends.
    Reencrypt {
        #[command(flatten)]
        admin: AdminPort,
        /// Start the pass and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct KeyFile {
    /// The key file to edit.
    #[arg(long, env = "STORAGE_KEYS_FILE")]
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct AdminPort {
    /// A gateway's admin port.
    #[arg(
        long,
        env = "GATEWAY_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    admin: String,
}

impl AdminPort {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.admin.trim_end_matches('/'))
    }

    async fn call(&self, post: bool, path: &str) -> anyhow::Result<(u16, Value)> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let url = self.url(path);
        let request = if post {
            client.post(&url)
        } else {
            client.get(&url)
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("the gateway's admin port at {}", self.admin))?;
        let status = response.status().as_u16();
        let body = response
            .json::<Value>()
            .await
            .with_context(|| format!("{url} answered {status} without JSON"))?;
        Ok((status, body))
    }
}

/// Runs a `gateway keys` command, printing what it did.
pub async fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Add { file } => {
            let (text, id) = crypto::add_key(&read(&file.file)?)?;
            crypto::replace_key_file(&file.file, &text)?;
            println!("{id}");
            eprintln!(
                "added key {id} to {} (not primary yet): reload every gateway and dispatcher, \
                 then `gateway keys promote {id}`",
                file.file.display()
            );
        }
        KeysCommand::Promote { file, id } => {
            let text = crypto::set_primary(&read(&file.file)?, id)?;
            crypto::replace_key_file(&file.file, &text)?;
            eprintln!(
                "key {id} is primary in {}: reload every process, then `gateway keys reencrypt`",
                file.file.display()
            );
        }
        KeysCommand::Retire {
            file,
            id,
            admin,
            force,
        } => {
            let text = read(&file.file)?;
            let text_after = crypto::remove_key(&text, id)?;
            if !force {
                let primary = crypto::Keyring::parse(&text)?.primary();
                let (_, state) = admin.call(false, "/admin/keys").await?;
                check_retirable(&state, primary)?;
            }
            crypto::replace_key_file(&file.file, &text_after)?;
            eprintln!(
                "key {id} removed from {}: reload every process",
                file.file.display()
            );
        }
        KeysCommand::Reload { admin } => {
            let (status, body) = admin.call(true, "/admin/keys/reload").await?;
            if status != 200 {
                bail!(
                    "the gateway kept its key ring ({status}): {}",
                    error_of(&body)
                );
            }
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        KeysCommand::Status { admin } => {
            let (_, body) = admin.call(false, "/admin/keys").await?;
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        KeysCommand::Reencrypt { admin, no_wait } => {
            let (status, body) = admin.call(true, "/admin/keys/reencrypt").await?;
            match status {
                202 => {}
                409 => bail!("a re-encryption pass is already running on {}", admin.admin),
                _ => bail!("the gateway refused ({status}): {}", error_of(&body)),
            }
            if no_wait {
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(());
            }
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (_, body) = admin.call(false, "/admin/keys").await?;
                let pass = &body["reencryption"];
                let line = format!(
                    "{}: {} rows read, {} sealed again with key {} ({} s)",
                    pass["state"].as_str().unwrap_or("?"),
                    pass["scanned"],
                    pass["rewritten"],
                    pass["primary"],
                    pass["seconds"]
                );
                match pass["state"].as_str() {
                    Some("running") => eprintln!("{line}"),
                    Some("done") => {
                        println!("{line}");
                        return Ok(());
                    }
                    _ => bail!("{line}: {}", pass["error"].as_str().unwrap_or("no pass")),
                }
            }
        }
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the key file {}", path.display()))
}

fn error_of(body: &Value) -> String {
    body["error"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned)
}

/// A key can go once the gateway uses the file's primary and a pass under it finished.
fn check_retirable(state: &Value, primary: u32) -> anyhow::Result<()> {
    if state["primary"].as_u64() != Some(u64::from(primary)) {
        bail!(
            "the gateway's primary key is {}, the file's is {primary}: reload it first",
            state["primary"]
        );
    }
    let pass = &state["reencryption"];
    if pass["state"].as_str() != Some("done")
        || pass["primary"].as_u64() != Some(u64::from(primary))
    {
        bail!(
            "no finished re-encryption pass under key {primary} on this gateway (last: {pass}): \
             run `gateway keys reencrypt` first, or retire with --force"
        );
    }
    Ok(())
}
