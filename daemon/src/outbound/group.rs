//! Proxy groups. `select` follows the user's choice (`PUT /proxies/{group}`), kept in the
//! state directory across restarts; until one is made, the first member is used.

use std::sync::Mutex;

use crate::config::GroupKind;

/// A group of outbounds.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub kind: GroupKind,
    /// Member names (proxies, groups, provider proxies), in order.
    pub members: Vec<String>,
    /// The user's choice (select groups).
    selected: Mutex<Option<String>>,
    pub hidden: bool,
    pub icon: String,
    /// The health-check URL (`testUrl` in the API), if any.
    pub test_url: String,
    /// Members may not carry UDP (`disable-udp: true`).
    pub disable_udp: bool,
}

impl Group {
    pub fn new(name: String, kind: GroupKind, members: Vec<String>) -> Group {
        Group {
            name,
            kind,
            members,
            selected: Mutex::new(None),
            hidden: false,
            icon: String::new(),
            test_url: String::new(),
            disable_udp: false,
        }
    }

    /// The member flows go to now.
    pub fn current(&self) -> Option<&str> {
        let selected = self.selected.lock().unwrap_or_else(|p| p.into_inner());
        let chosen = selected
            .as_deref()
            .and_then(|s| self.members.iter().find(|m| *m == s));
        chosen.or(self.members.first()).map(String::as_str)
    }

    /// The explicit choice, if any.
    pub fn selected(&self) -> Option<String> {
        self.selected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Chooses `member`; false if it is not one.
    pub fn select(&self, member: &str) -> bool {
        if !self.members.iter().any(|m| m == member) {
            return false;
        }
        *self.selected.lock().unwrap_or_else(|p| p.into_inner()) = Some(member.to_owned());
        true
    }
}
