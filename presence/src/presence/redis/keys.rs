//! The names of Redis presence's keys and channels, built and parsed in one place.
//!
//! A user's keys share the hash tag `{<prefix>:u:<user>}` and a node's keys
//! `{<prefix>:n:<node>}`, so that a script touching several of them runs on one Redis
//! Cluster slot. Expiry notifications are parsed back into the user or node they name.

use crate::presence::Location;

/// Builds and parses the key names under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// A sorted set: the user's devices, `node|conn|device`, scored by expiry (ms).
    pub(super) fn devs_key(&self, user: &str) -> String {
        format!("{{{}:u:{user}}}:devs", self.prefix)
    }

    /// When the user was last seen (ms), set when the last device goes.
    pub(super) fn seen_key(&self, user: &str) -> String {
        format!("{{{}:u:{user}}}:seen", self.prefix)
    }

    /// The user's send budget (GCRA's theoretical arrival time, µs).
    pub(super) fn sends_key(&self, user: &str) -> String {
        format!("{{{}:u:{user}}}:sends", self.prefix)
    }

    /// Every node that marked itself alive and was not reaped since.
    pub(super) fn nodes_key(&self) -> String {
        format!("{{{}}}:nodes", self.prefix)
    }

    /// One of a node's keys: `alive`, `users` or `reap`.
    pub(super) fn node_key(&self, node: &str, what: &str) -> String {
        format!("{{{}:n:{node}}}:{what}", self.prefix)
    }

    /// The channel a node receives its deliveries on.
    pub(super) fn deliver_channel(&self, node: &str) -> String {
        format!("{}:deliver:{node}", self.prefix)
    }

    /// The channel every process hears presence changes on.
    pub(super) fn changes_channel(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    /// The node a delivery channel belongs to.
    pub(super) fn delivery_node<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(&self.prefix)?
            .strip_prefix(":deliver:")
    }

    /// The user whose devices key this is.
    pub(super) fn devs_user<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix('{')?
            .strip_prefix(&self.prefix)?
            .strip_prefix(":u:")?
            .strip_suffix("}:devs")
    }

    /// The node whose liveness key this is.
    pub(super) fn alive_node<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix('{')?
            .strip_prefix(&self.prefix)?
            .strip_prefix(":n:")?
            .strip_suffix("}:alive")
    }
}

/// A device's member in its user's devices set: `node|conn|device`.
pub(super) fn member(at: &Location) -> String {
    format!("{}|{}|{}", at.node, at.conn, at.device)
}

/// The device a member names. Split from the right, so a node id may contain `|`.
pub(super) fn parse_member(m: &str) -> Option<Location> {
    let mut parts = m.rsplitn(3, '|');
    let device = parts.next()?;
    let conn = parts.next()?.parse().ok()?;
    let node = parts.next()?;
    Some(Location {
        node: node.to_owned(),
        device: device.to_owned(),
        conn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_what_built_it() {
        let keys = Keys::new("chat");
        assert_eq!(keys.devs_key("alice"), "{chat:u:alice}:devs");
        assert_eq!(keys.devs_user(&keys.devs_key("alice")), Some("alice"));
        assert_eq!(
            keys.alive_node(&keys.node_key("gw-1", "alive")),
            Some("gw-1")
        );
        assert_eq!(
            keys.delivery_node(&keys.deliver_channel("gw-1")),
            Some("gw-1")
        );
        // Other keys, and another prefix's keys, are not mistaken for them.
        assert_eq!(keys.devs_user(&keys.seen_key("alice")), None);
        assert_eq!(keys.alive_node(&keys.node_key("gw-1", "users")), None);
        assert_eq!(keys.devs_user("{chatx:u:alice}:devs"), None);
        assert_eq!(keys.delivery_node("chatx:deliver:gw-1"), None);
    }

    #[test]
    fn a_member_names_its_device_even_with_bars_in_the_node() {
        let at = Location {
            node: "gw|1".into(),
            conn: 42,
            device: "phone".into(),
        };
        assert_eq!(parse_member(&member(&at)), Some(at));
        assert_eq!(parse_member("gw|notanumber|phone"), None);
        assert_eq!(parse_member("phone"), None);
    }
}
