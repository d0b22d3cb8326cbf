//! Sticky sessions for `load-balance` groups with `strategy: sticky-sessions`: a (source,
//! destination) pair stays on one member for a TTL, kept in the state directory so it survives
//! a restart, and is moved when its member dies.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// How long a pair stays on its member without being used, unless the group says.
pub const TTL: Duration = Duration::from_secs(1800);
/// Pairs kept at most (oldest dropped first).
const MAX: usize = 65_536;
/// The file in the state directory.
pub const FILE: &str = "affinity.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    group: String,
    source: IpAddr,
    key: String,
    member: String,
    /// Unix seconds after which the entry is void.
    until: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

type Key = (String, IpAddr, String);

/// Sticky pairs of every group.
#[derive(Debug, Default)]
pub struct Affinity {
    map: Mutex<HashMap<Key, (String, u64)>>,
    file: Option<PathBuf>,
    changed: AtomicBool,
}

impl Affinity {
    /// Loads what `dir` keeps (entries still valid).
    pub fn load(dir: Option<PathBuf>) -> Affinity {
        let file = dir.map(|d| d.join(FILE));
        let mut map = HashMap::new();
        if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            let entries: Vec<Entry> = serde_json::from_str(&text).unwrap_or_default();
            let t = now();
            for e in entries.into_iter().filter(|e| e.until > t) {
                map.insert((e.group, e.source, e.key), (e.member, e.until));
            }
        }
        Affinity {
            map: Mutex::new(map),
            file,
            changed: AtomicBool::new(false),
        }
    }

    /// The member `group` gave (`source`, `key`), if still valid.
    pub fn get(&self, group: &str, source: IpAddr, key: &str) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(group.to_owned(), source, key.to_owned()))
            .filter(|(_, until)| *until > now())
            .map(|(m, _)| m.clone())
    }

    /// Pins (`source`, `key`) to `member` for another TTL.
    pub fn put(&self, group: &str, source: IpAddr, key: &str, member: &str, ttl: Duration) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX {
            let t = now();
            map.retain(|_, (_, until)| *until > t);
            if map.len() >= MAX
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (_, u))| *u)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        self.changed.store(true, Ordering::Relaxed);
        map.insert(
            (group.to_owned(), source, key.to_owned()),
            (member.to_owned(), now() + ttl.as_secs().max(1)),
        );
    }

    /// [`Affinity::save`] if anything changed since the last.
    pub fn save_if_changed(&self) {
        if self.changed.load(Ordering::Relaxed) {
            self.save();
        }
    }

    /// Writes the valid entries to the state directory.
    pub fn save(&self) {
        let Some(file) = &self.file else { return };
        self.changed.store(false, Ordering::Relaxed);
        let t = now();
        let entries: Vec<Entry> = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(_, (_, until))| *until > t)
                .map(|((group, source, key), (member, until))| Entry {
                    group: group.clone(),
                    source: *source,
                    key: key.clone(),
                    member: member.clone(),
                    until: *until,
                })
                .collect()
        };
        let text = serde_json::to_string(&entries).unwrap_or_default();
        if let Err(e) = file
            .parent()
            .map_or(Ok(()), crate::state::ensure)
            .map_err(|e| e.to_string())
            .and_then(|()| crate::state::write_private(file, &text).map_err(|e| e.to_string()))
        {
            tracing::warn!("keeping sticky sessions in {}: {e}", file.display());
        }
    }
}
