//! `geo-auto-update`: geodata files downloaded from `geox-url` into the state directory — at
//! start when missing, then every `geo-update-interval` hours. A download is checked (it must
//! open as what it claims to be) before it atomically replaces the old file; on failure the
//! old file stays.

use std::{path::Path, time::Duration};

use super::geo::{self, GEOIP_FILES, GEOSITE_FILE};
use crate::{config::Config, outbound::Outbounds};

const TIMEOUT: Duration = Duration::from_secs(120);
const MAX: usize = 256 << 20;

/// Which file, from where, and how to check it.
fn files(config: &Config, ip: bool, site: bool) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if ip {
        out.push((GEOIP_FILES[0], config.geox_url.mmdb.clone()));
    }
    if site {
        out.push((GEOSITE_FILE, config.geox_url.geosite.clone()));
    }
    out
}

fn valid(file: &str, bytes: &[u8]) -> Result<(), String> {
    if file == GEOSITE_FILE {
        use prost::Message;
        geo::GeoSiteList::decode(bytes)
            .map(drop)
            .map_err(|e| format!("not a geosite.dat: {e}"))
    } else {
        maxminddb::Reader::from_source(bytes)
            .map(drop)
            .map_err(|e| format!("not a MaxMind-format database: {e}"))
    }
}

/// Downloads one file; true if it was replaced.
pub async fn download(
    dir: &Path,
    file: &str,
    url: &str,
    outbounds: &Outbounds,
) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let body = crate::fetch::get(
        outbounds,
        &crate::fetch::Request_ {
            url: &parsed,
            method: hyper::Method::GET,
            via: "DIRECT",
            timeout: TIMEOUT,
            max_body: MAX,
            verify: true,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    valid(file, &body).map_err(|e| format!("{url}: {e}"))?;
    let path = dir.join(file);
    let tmp = path.with_extension("download");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, &body))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Downloads the files the rules need that are missing.
pub async fn ensure(config: &Config, dir: &Path, ip: bool, site: bool, outbounds: &Outbounds) {
    for (file, url) in files(config, ip, site) {
        let present = if file == GEOSITE_FILE {
            dir.join(file).exists()
        } else {
            GEOIP_FILES.iter().any(|f| dir.join(f).exists())
        };
        if present {
            continue;
        }
        match download(dir, file, &url, outbounds).await {
            Ok(()) => tracing::info!("geodata: downloaded {file} from {url}"),
            Err(e) => tracing::error!("geodata: {file}: {e}"),
        }
    }
}

/// Downloads every geodata file the rules use again; the old ones stay on failure. Returns
/// whether any file changed.
pub async fn update(
    config: &Config,
    dir: &Path,
    ip: bool,
    site: bool,
    outbounds: &Outbounds,
) -> bool {
    let mut changed = false;
    for (file, url) in files(config, ip, site) {
        match download(dir, file, &url, outbounds).await {
            Ok(()) => {
                tracing::info!("geodata: updated {file} from {url}");
                changed = true;
            }
            Err(e) => tracing::warn!("geodata: updating {file}: {e}; the old file stays"),
        }
    }
    changed
}
