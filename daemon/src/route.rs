//! Rules → [`Route`]. For now the one rule every config ends with, `MATCH` → DIRECT; rule
//! lists and groups plug in here and fill the same fields.

/// Where a flow goes and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The rule that matched, as Clash clients show it (`Match`, `DomainSuffix`, ...).
    pub rule: String,
    /// The rule's argument (empty for `Match`).
    pub payload: String,
    /// Outbounds from the leaf to the matched one (Clash's `chains` order).
    pub chains: Vec<String>,
}

/// The router.
#[derive(Debug, Default, Clone)]
pub struct Router;

impl Router {
    /// The route for a flow.
    pub fn route(&self) -> Route {
        Route {
            rule: "Match".to_owned(),
            payload: String::new(),
            chains: vec!["DIRECT".to_owned()],
        }
    }
}
