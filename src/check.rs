//! `popivr check`: validate the configuration, warn about risky settings,
//! log in with each account in use. Never prints a secret.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use popivr::config;

pub fn check(path: &Path, offline: bool) -> Result<ExitCode> {
    let config = config::load_file(path)?;
    println!("{}: configuration is valid", path.display());
    for w in &config.warnings {
        println!("warning: {w}");
    }
    for (name, p) in &config.profiles {
        println!(
            "profile [{name}]: {} target(s), {} reply rule(s), {} key(s), timeout {:?}",
            p.targets.len(),
            p.replies.len(),
            p.keys.len(),
            p.timeout
        );
    }
    if config.profiles.is_empty() {
        bail!("{} defines no profile", path.display());
    }
    let used: BTreeSet<&str> = config
        .profiles
        .values()
        .filter(|p| !p.targets.is_empty())
        .map(|p| p.account.as_str())
        .collect();
    if offline || used.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut failed = 0;
    for name in used {
        let Some(account) = config.accounts.get(name) else {
            continue;
        };
        let server = account.serverhost.as_deref().unwrap_or("the JID's domain");
        match rt.block_on(popivr::xmpp::login(account)) {
            Ok(conn) => println!(
                "account [{name}]: logged in as {} via {server}:{} ({}, {})",
                conn.jid, account.port, conn.mechanism, conn.timings
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "account [{name}]: login FAILED via {server}:{}: {e}",
                    account.port
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} account(s) could not log in");
    }
    Ok(ExitCode::SUCCESS)
}
