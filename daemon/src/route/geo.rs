//! Geodata: GEOIP from a MaxMind-format database (`geoip.metadb` as mihomo ships it, or a
//! `Country.mmdb`), GEOSITE from a v2ray `geosite.dat` (protobuf `GeoSiteList`). Read from the
//! state directory; only the GEOSITE lists the rules name are kept in memory.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::sets::{DomainPattern, DomainSet, DomainSetBuilder};

/// Geodata that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("GEOSITE `{0}` is not in {1}")]
    NoSite(String, PathBuf),
}

/// GEOIP database file names tried, in order.
pub const GEOIP_FILES: [&str; 2] = ["geoip.metadb", "Country.mmdb"];
/// The GEOSITE file name.
pub const GEOSITE_FILE: &str = "geosite.dat";

/// Loaded geodata.
#[derive(Default)]
pub struct Geo {
    ip: Option<(maxminddb::Reader<Vec<u8>>, PathBuf)>,
    sites: HashMap<String, Vec<DomainPattern>>,
    /// The same lists compiled, for GEOSITE inside logic rules and sniffer patterns.
    site_sets: HashMap<String, DomainSet>,
}

impl std::fmt::Debug for Geo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geo")
            .field("ip", &self.ip.as_ref().map(|(_, p)| p))
            .field("sites", &self.sites.len())
            .finish()
    }
}

/// One record of a GEOIP database: mihomo's MetaDB stores a code or a list of codes; MaxMind
/// and sing-box databases a country object.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Record {
    Code(String),
    Codes(Vec<String>),
    Country {
        country: Option<IsoCode>,
        #[serde(default)]
        registered_country: Option<IsoCode>,
    },
}

#[derive(Debug, serde::Deserialize)]
struct IsoCode {
    iso_code: Option<String>,
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

impl Geo {
    /// Loads what the rules need from `dir`: the GEOIP database when `ip` is set, and the
    /// GEOSITE lists named in `sites` (`name` or `name@attribute`).
    pub fn load(dir: &Path, ip: bool, sites: &[String]) -> Result<Geo, Error> {
        let mut geo = Geo::default();
        if ip {
            let path = GEOIP_FILES
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists())
                .ok_or_else(|| {
                    file_error(
                        &dir.join(GEOIP_FILES[0]),
                        "no GEOIP database (geoip.metadb or Country.mmdb): put one there or set \
                         geo-auto-update: true",
                    )
                })?;
            geo.ip = Some((open_mmdb(&path)?, path));
        }
        if !sites.is_empty() {
            let path = dir.join(GEOSITE_FILE);
            let bytes = std::fs::read(&path).map_err(|e| file_error(&path, e))?;
            geo.sites = parse_sites(&bytes, sites).map_err(|e| match e {
                SiteError::Decode(m) => file_error(&path, m),
                SiteError::Missing(name) => Error::NoSite(name, path.clone()),
            })?;
            for (name, patterns) in &geo.sites {
                let mut b = DomainSetBuilder::default();
                patterns.iter().cloned().for_each(|p| b.add(p, 0));
                let set = b
                    .build()
                    .map_err(|e| file_error(&path, format!("{name}: {e}")))?;
                geo.site_sets.insert(name.clone(), set);
            }
        }
        Ok(geo)
    }

    /// The country codes of `ip` (lower-case), empty when unknown.
    pub fn countries(&self, ip: IpAddr) -> Vec<String> {
        let Some((reader, _)) = &self.ip else {
            return Vec::new();
        };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let record: Option<Record> = reader
            .lookup(ip)
            .ok()
            .and_then(|r| r.decode().ok())
            .flatten();
        let codes = match record {
            Some(Record::Code(c)) => vec![c],
            Some(Record::Codes(c)) => c,
            Some(Record::Country {
                country,
                registered_country,
            }) => country
                .or(registered_country)
                .and_then(|c| c.iso_code)
                .into_iter()
                .collect(),
            None => Vec::new(),
        };
        codes.into_iter().map(|c| c.to_ascii_lowercase()).collect()
    }

    /// Whether GEOIP and GEOSITE data are in use.
    pub fn in_use(&self) -> (bool, bool) {
        (self.ip.is_some(), !self.sites.is_empty())
    }

    /// GEOSITE list `name` compiled, if it was loaded.
    pub fn site_set(&self, name: &str) -> Option<&DomainSet> {
        self.site_sets.get(&name.to_ascii_lowercase())
    }

    /// The patterns of GEOSITE list `name` (loaded at start), if it was loaded.
    pub fn site(&self, name: &str) -> Option<&[DomainPattern]> {
        self.sites
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
    }
}

/// Opens and checks a MaxMind-format database.
pub fn open_mmdb(path: &Path) -> Result<maxminddb::Reader<Vec<u8>>, Error> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    maxminddb::Reader::from_source(bytes)
        .map_err(|e| file_error(path, format!("not a MaxMind-format database: {e}")))
}

mod proto {
    //! v2ray's `GeoSiteList` (router/config.proto), the fields tpacct reads.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GeoSiteList {
        #[prost(message, repeated, tag = "1")]
        pub entry: Vec<GeoSite>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GeoSite {
        #[prost(string, tag = "1")]
        pub country_code: String,
        #[prost(message, repeated, tag = "2")]
        pub domain: Vec<Domain>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Domain {
        /// 0 plain (keyword), 1 regex, 2 domain (suffix), 3 full.
        #[prost(int32, tag = "1")]
        pub r#type: i32,
        #[prost(string, tag = "2")]
        pub value: String,
        #[prost(message, repeated, tag = "3")]
        pub attribute: Vec<Attribute>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Attribute {
        #[prost(string, tag = "1")]
        pub key: String,
    }
}

pub use proto::{Attribute as SiteAttribute, Domain as SiteDomain, GeoSite, GeoSiteList};

enum SiteError {
    Decode(String),
    Missing(String),
}

fn parse_sites(
    bytes: &[u8],
    wanted: &[String],
) -> Result<HashMap<String, Vec<DomainPattern>>, SiteError> {
    use prost::Message;
    let list = GeoSiteList::decode(bytes)
        .map_err(|e| SiteError::Decode(format!("not a geosite.dat (GeoSiteList): {e}")))?;
    let mut out = HashMap::new();
    for name in wanted {
        let key = name.to_ascii_lowercase();
        let (code, attribute) = match key.split_once('@') {
            Some((c, a)) => (c.to_owned(), Some(a.to_owned())),
            None => (key.clone(), None),
        };
        let entry = list
            .entry
            .iter()
            .find(|e| e.country_code.eq_ignore_ascii_case(&code))
            .ok_or_else(|| SiteError::Missing(name.clone()))?;
        let patterns = entry
            .domain
            .iter()
            .filter(|d| {
                attribute
                    .as_deref()
                    .is_none_or(|a| d.attribute.iter().any(|x| x.key.eq_ignore_ascii_case(a)))
            })
            .filter_map(|d| {
                let v = d.value.to_ascii_lowercase();
                Some(match d.r#type {
                    0 => DomainPattern::Keyword(v),
                    1 => DomainPattern::Regex(d.value.clone()),
                    2 => DomainPattern::Suffix(v),
                    3 => DomainPattern::Exact(v),
                    _ => return None,
                })
            })
            .collect();
        out.insert(key, patterns);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use prost::Message;

    use super::*;

    /// A small geosite.dat: `test` with one domain of each kind, one tagged `@cn`.
    pub(crate) fn geosite_dat() -> Vec<u8> {
        let d = |t: i32, v: &str, attr: Option<&str>| SiteDomain {
            r#type: t,
            value: v.into(),
            attribute: attr
                .map(|a| SiteAttribute { key: a.into() })
                .into_iter()
                .collect(),
        };
        GeoSiteList {
            entry: vec![GeoSite {
                country_code: "TEST".into(),
                domain: vec![
                    d(2, "suffix.test", None),
                    d(3, "full.test", Some("cn")),
                    d(0, "keyword", None),
                    d(1, "^re[0-9]+\\.test$", None),
                ],
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn geosite_lists_and_attributes() {
        let sites = parse_sites(&geosite_dat(), &["test".into(), "TEST@cn".into()])
            .unwrap_or_else(|_| panic!("parse"));
        assert_eq!(sites["test"].len(), 4);
        assert_eq!(
            sites["test@cn"],
            vec![DomainPattern::Exact("full.test".into())]
        );
        assert!(matches!(
            parse_sites(&geosite_dat(), &["nope".into()]),
            Err(SiteError::Missing(_))
        ));
        assert!(matches!(
            parse_sites(b"\xff\xff garbage", &["x".into()]),
            Err(SiteError::Decode(_))
        ));
    }
}
