//! Where the CLI's settings come from: flags > environment > TOML file
//! (`--config`, `CAIRN_CONFIG`, or `~/.config/cairn/cairn.toml`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Keys of the CLI's TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// Coordinator addresses.
    #[serde(default)]
    pub coordinator: Vec<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
}

/// Marker line of a config file written by `cairn dev-cluster`.
pub const DEV_MARKER: &str = "# written by cairn dev-cluster";

/// The user's default config file.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cairn").join("cairn.toml"))
}

/// Loads the config file named, or the default one if it exists.
pub fn load(explicit: Option<&Path>) -> anyhow::Result<FileConfig> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match default_path() {
            Some(p) if p.exists() => p,
            _ => return Ok(FileConfig::default()),
        },
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Reads the password: `--password-file`/`CAIRN_PASSWORD_FILE`, `CAIRN_PASSWORD`, the config
/// file's `password-file`, or a prompt on a terminal.
pub fn password(
    flag_file: Option<&Path>,
    cfg: &FileConfig,
    confirm: bool,
) -> anyhow::Result<Vec<u8>> {
    if let Some(f) = flag_file.or(cfg.password_file.as_deref()) {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("reading password file {}", f.display()))?;
        return Ok(s.trim_end_matches(['\n', '\r']).as_bytes().to_vec());
    }
    if let Ok(p) = std::env::var("CAIRN_PASSWORD") {
        return Ok(p.into_bytes());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!("no password: use --password-file, CAIRN_PASSWORD_FILE or CAIRN_PASSWORD");
    }
    let p = rpassword::prompt_password("password: ")?;
    if confirm && rpassword::prompt_password("again: ")? != p {
        bail!("the passwords do not match");
    }
    Ok(p.into_bytes())
}
