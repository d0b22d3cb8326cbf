//! Flows → [`Route`]: the mode (`rule`, `global`, `direct`) and the GLOBAL selector decide,
//! over the routing tpacct has today: the `Match` rule, DIRECT and REJECT. Rule lists and more
//! groups plug in here and fill the same fields.

use std::sync::{Arc, Mutex};

use crate::config::Mode;

/// Where a flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    Direct,
    Reject,
}

impl Outbound {
    pub const ALL: [Outbound; 2] = [Outbound::Direct, Outbound::Reject];

    pub fn name(self) -> &'static str {
        match self {
            Outbound::Direct => "DIRECT",
            Outbound::Reject => "REJECT",
        }
    }

    /// The type Clash clients show for it.
    pub fn kind(self) -> &'static str {
        match self {
            Outbound::Direct => "Direct",
            Outbound::Reject => "Reject",
        }
    }

    pub fn from_name(name: &str) -> Option<Outbound> {
        Outbound::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// Name of the one selector group.
pub const GLOBAL: &str = "GLOBAL";

/// Where a flow goes and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub outbound: Outbound,
    /// The rule that matched, as Clash clients show it (`Match`; empty outside rule mode).
    pub rule: String,
    /// The rule's argument (empty for `Match`).
    pub payload: String,
    /// Outbounds from the leaf to the matched one (Clash's `chains` order).
    pub chains: Vec<String>,
}

/// The mode and the GLOBAL selection, changed at run time through the API.
#[derive(Debug)]
pub struct Selection {
    mode: Mutex<Mode>,
    global: Mutex<Outbound>,
}

impl Selection {
    pub fn new(mode: Mode) -> Arc<Selection> {
        Arc::new(Selection {
            mode: Mutex::new(mode),
            global: Mutex::new(Outbound::Direct),
        })
    }

    pub fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    pub fn global(&self) -> Outbound {
        *self.global.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn select_global(&self, outbound: Outbound) {
        *self.global.lock().unwrap_or_else(|p| p.into_inner()) = outbound;
    }
}

/// The router.
#[derive(Debug, Clone)]
pub struct Router {
    selection: Arc<Selection>,
}

impl Router {
    pub fn new(selection: Arc<Selection>) -> Router {
        Router { selection }
    }

    /// The route for a new flow.
    pub fn route(&self) -> Route {
        let (outbound, rule, chains) = match self.selection.mode() {
            Mode::Rule => (Outbound::Direct, "Match", vec!["DIRECT".to_owned()]),
            Mode::Direct => (Outbound::Direct, "", vec!["DIRECT".to_owned()]),
            Mode::Global => {
                let leaf = self.selection.global();
                (leaf, "", vec![leaf.name().to_owned(), GLOBAL.to_owned()])
            }
        };
        Route {
            outbound,
            rule: rule.to_owned(),
            payload: String::new(),
            chains,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_the_global_selection_decide() {
        let selection = Selection::new(Mode::Rule);
        let router = Router::new(selection.clone());
        assert_eq!(router.route().rule, "Match");
        assert_eq!(router.route().chains, ["DIRECT"]);
        selection.set_mode(Mode::Global);
        selection.select_global(Outbound::Reject);
        let r = router.route();
        assert_eq!(
            (r.outbound, r.chains),
            (Outbound::Reject, vec!["REJECT".into(), "GLOBAL".into()])
        );
        selection.set_mode(Mode::Direct);
        assert_eq!(router.route().outbound, Outbound::Direct);
    }
}
