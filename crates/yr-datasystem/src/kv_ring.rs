//! The ring of KV owners: consistent hashing with virtual nodes over the alive nodes of a
//! cluster. Each node has [`VIRTUAL_NODES`] points on a 64-bit ring, at the hash of
//! `<node id>#<i>`; a key belongs to the node of the first point at or after the key's hash
//! (wrapping around). Adding or removing one node moves only the keys between its points and
//! their predecessors, about `1 / nodes` of them, and every node computes the same owner from
//! the same members. The hash is FNV-1a finished with a 64-bit mixer (stable across builds and
//! platforms, unlike `std`'s hasher).

use std::collections::BTreeMap;

/// Points per node on the ring: enough for an even share (within about ±20% at 3 nodes).
pub const VIRTUAL_NODES: usize = 128;

/// A node on the ring.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// The node's id.
    pub node_id: String,
    /// Where other nodes reach its DataWorker service (`host:port`).
    pub address: String,
}

/// Which node owns each key.
///
/// ```
/// use yr_datasystem::kv_ring::{HashRing, Member};
/// let member = |id: &str| Member { node_id: id.into(), address: format!("{id}:1") };
/// let ring = HashRing::new([member("a"), member("b"), member("c")]);
/// let owner = ring.owner("some key").unwrap();
/// // Every node that knows the same members agrees.
/// let again = HashRing::new([member("c"), member("a"), member("b")]);
/// assert_eq!(again.owner("some key"), Some(owner));
/// assert!(HashRing::new([]).owner("k").is_none());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HashRing {
    points: BTreeMap<u64, usize>,
    members: Vec<Member>,
}

/// The ring position of `data`.
pub fn hash(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer: FNV alone clusters keys that differ in their last bytes.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl HashRing {
    /// The ring of `members` (duplicates of a node id count once).
    pub fn new(members: impl IntoIterator<Item = Member>) -> HashRing {
        let mut members: Vec<Member> = members.into_iter().collect();
        members.sort();
        members.dedup_by(|a, b| a.node_id == b.node_id);
        let mut points = BTreeMap::new();
        for (index, member) in members.iter().enumerate() {
            for point in 0..VIRTUAL_NODES {
                let position = hash(format!("{}#{point}", member.node_id).as_bytes());
                // A collision (vanishingly rare) goes to the smaller node id, on every node.
                points.entry(position).or_insert(index);
            }
        }
        HashRing { points, members }
    }

    /// The owner of `key`, or `None` on an empty ring.
    pub fn owner(&self, key: &str) -> Option<&Member> {
        let position = hash(key.as_bytes());
        let (_, index) = self
            .points
            .range(position..)
            .next()
            .or_else(|| self.points.iter().next())?;
        self.members.get(*index)
    }

    /// The nodes on the ring, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Whether `node_id` is on the ring.
    pub fn contains(&self, node_id: &str) -> bool {
        self.members.iter().any(|m| m.node_id == node_id)
    }

    /// The same ring without `node_id`.
    pub fn without(&self, node_id: &str) -> HashRing {
        HashRing::new(
            self.members
                .iter()
                .filter(|m| m.node_id != node_id)
                .cloned(),
        )
    }

    /// Whether the ring has no node.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            node_id: id.into(),
            address: format!("{id}.example:1"),
        }
    }

    fn ring(ids: &[&str]) -> HashRing {
        HashRing::new(ids.iter().map(|id| member(id)))
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-key-{i}")).collect()
    }

    fn owners(ring: &HashRing, keys: &[String]) -> Vec<String> {
        keys.iter()
            .map(|k| ring.owner(k).unwrap().node_id.clone())
            .collect()
    }

    #[test]
    fn keys_spread_evenly_over_the_nodes() {
        for ids in [&["a", "b", "c"][..], &["n1", "n2", "n3", "n4", "n5"]] {
            let ring = ring(ids);
            let keys = keys(60_000);
            let fair = keys.len() / ids.len();
            for id in ids {
                let share = owners(&ring, &keys).iter().filter(|o| o == id).count();
                assert!(
                    share > fair * 7 / 10 && share < fair * 13 / 10,
                    "{id} owns {share} of {} keys (fair: {fair})",
                    keys.len()
                );
            }
        }
    }

    #[test]
    fn a_join_moves_only_keys_to_the_new_node_and_about_their_share() {
        let keys = keys(30_000);
        let before = owners(&ring(&["a", "b", "c"]), &keys);
        let after = owners(&ring(&["a", "b", "c", "d"]), &keys);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                assert_eq!(new, "d", "a key moved between nodes that stayed");
                moved += 1;
            }
        }
        let fair = keys.len() / 4;
        assert!(
            moved > fair * 7 / 10 && moved < fair * 13 / 10,
            "{moved} keys moved (fair: {fair})"
        );
    }

    #[test]
    fn a_loss_moves_only_the_lost_nodes_keys() {
        let keys = keys(30_000);
        let full = ring(&["a", "b", "c"]);
        let before = owners(&full, &keys);
        let after = owners(&full.without("b"), &keys);
        for (old, new) in before.iter().zip(&after) {
            if old == "b" {
                assert_ne!(new, "b");
            } else {
                assert_eq!(old, new, "a key of a node that stayed moved");
            }
        }
    }

    #[test]
    fn the_order_members_arrive_in_does_not_matter_and_duplicates_count_once() {
        let keys = keys(2_000);
        let one = ring(&["a", "b", "c"]);
        let other = ring(&["c", "b", "a", "b"]);
        assert_eq!(owners(&one, &keys), owners(&other, &keys));
        assert_eq!(other.members().len(), 3);
        assert!(one.contains("b") && !one.without("b").contains("b"));
    }

    #[test]
    fn one_node_owns_everything_and_an_empty_ring_nothing() {
        let solo = ring(&["only"]);
        assert!(keys(100)
            .iter()
            .all(|k| solo.owner(k).unwrap().node_id == "only"));
        assert!(HashRing::default().owner("k").is_none());
        assert!(HashRing::default().is_empty());
    }
}
