//! The state directory: what must outlive one run of the daemon (the generated controller
//! secret, group selections, the history store). `-d DIR` on the command line, else systemd's
//! `$STATE_DIRECTORY`, else `./tpacct-data`; made on first use, readable by its owner only.

use std::{
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// Where the state directory is when nothing says otherwise.
pub const DEFAULT_DIR: &str = "tpacct-data";
/// The generated controller secret's file inside the state directory.
pub const SECRET_FILE: &str = "secret";

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
}

/// The state directory for this run: `given`, else `$STATE_DIRECTORY` (its first entry), else
/// [`DEFAULT_DIR`].
pub fn dir(given: Option<&Path>) -> PathBuf {
    if let Some(dir) = given {
        return dir.to_owned();
    }
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Makes `dir` (mode 0700) if it is missing.
pub fn ensure(dir: &Path) -> Result<(), Error> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(source) => Err(Error::Dir {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// The controller secret: the configured one (an explicit empty string means none), else the
/// one generated at first start and kept in the state directory.
pub fn secret(configured: Option<&str>, dir: &Path) -> Result<Secret, Error> {
    if let Some(s) = configured {
        return Ok(Secret {
            value: s.to_owned(),
            generated_in: None,
        });
    }
    let path = dir.join(SECRET_FILE);
    let file_error = |source| Error::File {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            return Ok(Secret {
                value: text.trim().to_owned(),
                generated_in: Some(path),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_error(e)),
    }
    ensure(dir)?;
    let value = uuid::Uuid::new_v4().simple().to_string();
    write_private(&path, &value).map_err(file_error)?;
    Ok(Secret {
        value,
        generated_in: Some(path),
    })
}

/// Writes `text` to `path` atomically (a temporary file renamed over it), mode 0600.
pub fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The controller's secret and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub value: String,
    /// The file it was read from or generated into; None when configured.
    pub generated_in: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tpacct-state-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_secret_is_generated_once_and_kept() {
        let dir = tmp("gen");
        let first = secret(None, &dir).expect("generated");
        assert_eq!(first.value.len(), 32);
        assert_eq!(first.generated_in, Some(dir.join(SECRET_FILE)));
        let second = secret(None, &dir).expect("read back");
        assert_eq!(first, second, "the same secret on the next start");
        let mode = std::fs::metadata(dir.join(SECRET_FILE))
            .expect("file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_explicit_secret_wins_even_when_empty() {
        let dir = tmp("explicit");
        assert_eq!(secret(Some(""), &dir).expect("empty").value, "");
        assert_eq!(secret(Some("x"), &dir).expect("set").value, "x");
        assert!(!dir.exists(), "nothing written for a configured secret");
    }
}
