//! Placement: maps each of the [`PARTITIONS`] partitions to an ordered list of R nodes.
//!
//! Weighted rendezvous hashing: every (partition, node) pair gets a score from a hash, scaled by
//! the node's capacity; a partition's replicas are the best-scoring nodes, taken one per zone
//! first and then from any zone. Because each pair's score is independent of the other nodes,
//! adding one node to N moves about 1/(N+1) of the replica slots and removing one moves only the
//! slots it held: close to the minimum, with no global reshuffle. Pure functions only.

use std::collections::{BTreeMap, HashSet};

use cairn_proto::PARTITIONS;
use serde::{Deserialize, Serialize};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Node id.
    pub id: u64,
    /// Failure domain.
    pub zone: String,
    /// Weight (bytes of capacity).
    pub capacity: u64,
}

/// A committed placement layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Layout {
    /// Bumped each time an assignment changes.
    pub version: u64,
    /// Redundancy factor R.
    pub replicas: u32,
    /// Write quorum W.
    pub write_quorum: u32,
    /// Replica list per partition, primary first.
    pub partitions: Vec<Vec<u64>>,
    /// The assignment of the previous version (where data may still be while it moves).
    pub previous: Vec<Vec<u64>>,
}

fn score(partition: u32, node: u64, capacity: u64) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn-placement");
    h.update(&partition.to_be_bytes());
    h.update(&node.to_be_bytes());
    let d = h.finalize();
    let x = u64::from_be_bytes(d.as_bytes()[..8].try_into().expect("8 bytes"));
    // Uniform in (0, 1); weighted rendezvous: -w / ln(u).
    let u = ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let w = capacity.max(1) as f64;
    -w / u.ln()
}

/// Replica list of one partition.
pub fn place_partition(partition: u32, nodes: &[Candidate], replicas: usize) -> Vec<u64> {
    let mut ranked: Vec<(f64, &Candidate)> = nodes
        .iter()
        .map(|n| (score(partition, n.id, n.capacity), n))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
    let mut chosen = Vec::with_capacity(replicas);
    let mut zones = HashSet::new();
    // First pass: one per zone while distinct zones remain.
    for (_, n) in &ranked {
        if chosen.len() == replicas {
            break;
        }
        if zones.insert(n.zone.as_str()) {
            chosen.push(n.id);
        }
    }
    // Second pass: fill from any zone, in score order.
    for (_, n) in &ranked {
        if chosen.len() == replicas {
            break;
        }
        if !chosen.contains(&n.id) {
            chosen.push(n.id);
        }
    }
    // Keep score order (the primary is the best-scoring chosen node).
    let order: BTreeMap<u64, usize> = ranked
        .iter()
        .enumerate()
        .map(|(i, (_, n))| (n.id, i))
        .collect();
    chosen.sort_by_key(|id| order[id]);
    chosen
}

/// Assignments for every partition.
pub fn compute(nodes: &[Candidate], replicas: u32) -> Vec<Vec<u64>> {
    let r = replicas as usize;
    (0..PARTITIONS)
        .map(|p| place_partition(p, nodes, r))
        .collect()
}

/// The default write quorum for R: a majority.
pub fn majority(replicas: u32) -> u32 {
    replicas / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(n: u64, zones: u64) -> Vec<Candidate> {
        (1..=n)
            .map(|id| Candidate {
                id,
                zone: format!("z{}", id % zones.max(1)),
                capacity: 1 << 40,
            })
            .collect()
    }

    fn moved(a: &[Vec<u64>], b: &[Vec<u64>]) -> usize {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().filter(|n| !y.contains(n)).count())
            .sum()
    }

    proptest! {
        #[test]
        fn replicas_distinct_and_zone_spread(n in 1u64..12, zones in 1u64..5, r in 1u32..5) {
            let ns = nodes(n, zones);
            let zone_count = ns.iter().map(|c| c.zone.clone()).collect::<HashSet<_>>().len();
            for (p, set) in compute(&ns, r).iter().enumerate() {
                prop_assert_eq!(set.len(), (r as usize).min(n as usize), "partition {}", p);
                let uniq: HashSet<_> = set.iter().collect();
                prop_assert_eq!(uniq.len(), set.len());
                let zs: HashSet<_> = set.iter().map(|id| ns[(*id - 1) as usize].zone.clone()).collect();
                prop_assert_eq!(zs.len(), set.len().min(zone_count));
            }
        }

        #[test]
        fn adding_a_node_moves_about_its_share(n in 3u64..10, r in 1u32..4) {
            let before = compute(&nodes(n, 1), r);
            let after = compute(&nodes(n + 1, 1), r);
            let slots = (PARTITIONS * r) as f64;
            let ideal = slots / (n + 1) as f64;
            let m = moved(&before, &after) as f64;
            // Within 35% of the ideal share: a reshuffle would move most slots.
            prop_assert!(m <= ideal * 1.35, "moved {} ideal {}", m, ideal);
            prop_assert!(m >= ideal * 0.65, "moved {} ideal {}", m, ideal);
        }

        #[test]
        fn removing_a_node_moves_only_its_slots(n in 4u64..10, r in 1u32..4) {
            let all = nodes(n, 1);
            let before = compute(&all, r);
            let after = compute(&all[..all.len() - 1], r);
            let held = before.iter().filter(|s| s.contains(&n)).count();
            prop_assert_eq!(moved(&before, &after), held);
        }
    }

    #[test]
    fn balance_follows_capacity() {
        let mut ns = nodes(4, 1);
        ns[0].capacity = 1 << 42; // 4x the others
        let layout = compute(&ns, 1);
        let mut count = BTreeMap::new();
        for s in &layout {
            *count.entry(s[0]).or_insert(0usize) += 1;
        }
        let big = count[&1];
        for id in 2..=4 {
            assert!(big > count[&id], "bigger node holds more: {count:?}");
        }
        // Equal nodes within 25% of each other.
        let small: Vec<usize> = (2..=4).map(|id| count[&id]).collect();
        let (mn, mx) = (*small.iter().min().unwrap(), *small.iter().max().unwrap());
        assert!(mx as f64 <= mn as f64 * 1.25, "{small:?}");
    }

    #[test]
    fn equal_nodes_share_evenly() {
        let layout = compute(&nodes(5, 5), 3);
        let mut count = BTreeMap::new();
        for s in &layout {
            for id in s {
                *count.entry(*id).or_insert(0usize) += 1;
            }
        }
        let ideal = (PARTITIONS * 3) as f64 / 5.0;
        for (id, c) in count {
            assert!(
                (c as f64 - ideal).abs() < ideal * 0.15,
                "node {id}: {c} vs {ideal}"
            );
        }
    }
}
