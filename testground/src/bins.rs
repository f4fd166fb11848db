//! Where the test ground's binaries and module sources are.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The repository root (this crate lives in `<root>/testground`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testground/ has a parent").to_path_buf()
}

/// `$PICOTUN_CACHE`, or `~/.cache/picotun`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PICOTUN_CACHE") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/picotun")
}

/// `$PICOTUN_TESTGROUND_BIN`, or the `current` link `scripts/build-testground` maintains.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("PICOTUN_TESTGROUND_BIN").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("bin/current"))
}

/// The path of a test-ground binary, or an error naming the command that builds it.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary { name: name.to_string(), dir: bin_dir(), hint: String::new() })
    }
}

/// The OpenSSH server from Debian's openssh-server package.
pub fn sshd() -> Result<PathBuf> {
    let path = PathBuf::from(std::env::var_os("PICOTUN_SSHD").unwrap_or_else(|| "/usr/sbin/sshd".into()));
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            name: "sshd".into(),
            dir: path.parent().unwrap_or(Path::new("/")).to_path_buf(),
            hint: "; install it with `apt-get install openssh-server` (.ci/run does)".into(),
        })
    }
}

/// The Go module cache (`go env GOMODCACHE`).
pub fn go_mod_cache() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GOMODCACHE") {
        return Ok(dir.into());
    }
    let out = Command::new("go")
        .args(["env", "GOMODCACHE"])
        .output()
        .map_err(|e| Error::Setup(format!("running `go env GOMODCACHE` failed ({e}); is Go installed?")))?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dir.is_empty() {
        return Err(Error::Setup("`go env GOMODCACHE` printed nothing".into()));
    }
    Ok(dir.into())
}

/// The version `go_mod` (a go.mod path relative to the repo root) requires of `module`.
pub fn required_version(go_mod: &str, module: &str) -> Result<String> {
    let path = repo_root().join(go_mod);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    text.lines()
        .map(|l| l.trim().trim_start_matches("require").trim())
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(module)).then(|| parts.next().map(str::to_string)).flatten()
        })
        .next()
        .ok_or_else(|| Error::Setup(format!("{} does not require {module}", path.display())))
}

/// The unpacked source of a module in the Go module cache, checked to exist.
pub fn module_source(go_mod: &str, module: &str) -> Result<PathBuf> {
    let version = required_version(go_mod, module)?;
    // The module cache escapes upper-case letters as `!` + lower case.
    let escaped: String = module
        .chars()
        .flat_map(|c| if c.is_ascii_uppercase() { vec!['!', c.to_ascii_lowercase()] } else { vec![c] })
        .collect();
    let dir = go_mod_cache()?.join(format!("{escaped}@{version}"));
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::Setup(format!(
            "{module}@{version} is not in the Go module cache ({}): run `scripts/build-testground`",
            dir.display()
        )))
    }
}
